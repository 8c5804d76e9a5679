"""``make demo`` end to end, shortened: the real demo trainer (examples/train_demo.py) streams
to a real server, its LR goes 30x too high, the default alerts fire, and the operator code of
scripts/demo.py sends ``reduce_lr`` over REST, after which the loss comes back down."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.helpers import ROOT, ServerProcess, wait_until

STEPS, POISON_AT, BAD_AT = 500, 100, 240  # the divergence rule needs 220 steps of history


def _load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trimtab_demo_script", ROOT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


def test_the_demo_run_diverges_alerts_and_recovers_after_reduce_lr(server: ServerProcess, tmp_path: Path) -> None:
    uid = uuid.uuid4().hex
    args = ["--steps", str(STEPS), "--poison-at", str(POISON_AT), "--bad-at", str(BAD_AT)]
    args += ["--print-every", "50", "--min-step-time", "0"]
    env = {"TRIMTAB_SPOOL_DIR": str(tmp_path / "spool"), "TRIMTAB_REPLAY_ORPHANS": "0"}
    trainer = demo.start_trainer(server.url, uid, args, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def alive() -> bool:
        return bool(trainer.poll() is None)

    seen: list[dict[str, Any]] = []
    try:
        run = demo.find_run(server.url, uid, alive)
        assert run is not None and run["project"] == "demo"
        run_id = run["id"]
        alert = demo.watch_alerts(server.url, run_id, alive, seen.append)
        assert alert is not None, "the run ended with no divergence alert"
        sent = demo.send_reduce_lr(server.url, run_id)
        command = demo.wait_final(server.url, run_id, sent["id"])
        out, _ = trainer.communicate(timeout=120)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait(10)
    assert trainer.returncode == 0, out
    assert "done: run" in out and "fully stored" in out, out

    # Before the LR goes wrong, only the padding-only batch alerts; then the divergence does.
    early = {(a["rule"], a["first_step"]) for a in seen if a["first_step"] < BAD_AT}
    assert early == {("nonfinite-loss", POISON_AT), ("nonfinite-grad-norm", POISON_AT)}, seen
    assert alert["rule"] == "loss-divergence" and BAD_AT < alert["first_step"] < BAD_AT + 50, alert
    assert {"loss-spike", "grad-norm-gross"} <= {a["rule"] for a in seen}, seen

    assert command["status"] == "applied" and command["source"] == "human", command
    step = command["step"]
    assert alert["first_step"] < step < STEPS - 150, command  # room left to recover
    assert command["detail"]["after"] == pytest.approx([0.1 * lr for lr in command["detail"]["before"]])

    steps, values = demo.loss_series(server.url, run_id)
    assert steps == list(range(STEPS)) and math.isnan(values[POISON_AT])
    healthy = demo.mean_loss(steps, values, BAD_AT - 50, BAD_AT)
    before = demo.mean_loss(steps, values, step - 50, step)
    end = demo.mean_loss(steps, values, STEPS - 50, STEPS)
    assert before > 5 * end, (healthy, before, end)
    assert end < 2 * healthy, (healthy, before, end)

    wait_until(lambda: server.get(f"/api/v1/runs/{run_id}")["status"] == "finished", 30, "the run to finish")
