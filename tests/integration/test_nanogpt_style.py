"""The whole loop on a script written in the style of the popular public GPT training scripts
(tests/scripts/nanogpt_style.py: LR assigned by hand every iteration, gradient accumulation,
GradScaler, clipping, resume from its own checkpoint), through a live server: the run streams,
a corrupted batch pages at its own step, and reduce_lr, skip_batches and rollback sent over
REST do what docs/control.md says, read off what the script itself saves and logs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

from tests.helpers import ROOT, ServerProcess, post_command

SCRIPT = ROOT / "tests" / "scripts" / "nanogpt_style.py"
CORRUPT_AT, MAX_ITERS, SNAPSHOT_EVERY = 330, 400, 50
T = TypeVar("T")


def until(fetch: Callable[[], T | None], timeout: float, what: str) -> T:
    """What ``fetch`` returns once it is not None (or False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fetch()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def script_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nanogpt_style", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start(server: ServerProcess, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TRIMTAB_SERVER": server.url, "TRIMTAB_SPOOL_DIR": str(tmp_path / "spool")}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), f"--out_dir={tmp_path / 'out'}", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )


def applied(server: ServerProcess, run_id: int, ident: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        got: dict[str, Any] = server.get(f"/api/v1/runs/{run_id}/commands/{ident}")
        return got if got["status"] in ("applied", "rejected") else None

    result = until(done, 60, f"command {ident} to be applied")
    assert result["status"] == "applied", result
    return result


def run_named(server: ServerProcess, name: str) -> dict[str, Any] | None:
    runs = [r for r in server.get("/api/v1/runs?limit=100") if r["name"] == name]
    return runs[0] if runs else None


def last_step(server: ServerProcess, run_id: int) -> int:
    step = server.get(f"/api/v1/runs/{run_id}")["last_step"]
    return -1 if step is None else int(step)


def test_the_whole_loop_on_a_nanogpt_style_script(server: ServerProcess, tmp_path: Path) -> None:
    proc = start(server, tmp_path, f"--corrupt_iter={CORRUPT_AT}", f"--max_iters={MAX_ITERS}", "--throttle_ms=30")
    try:
        run = until(lambda: run_named(server, "gpt-scratch"), 60, "the run to appear")
        run_id = int(run["id"])
        until(lambda: last_step(server, run_id) >= 60, 60, "step 60")
        cut = applied(server, run_id, post_command(server, run_id, "reduce_lr", factor=0.5))
        until(lambda: last_step(server, run_id) >= cut["step"] + 20, 60, "20 steps after the cut")
        skip = applied(server, run_id, post_command(server, run_id, "skip_batches", n=2))
        until(lambda: last_step(server, run_id) >= max(180, skip["step"] + 10), 60, "step 180")
        back = applied(server, run_id, post_command(server, run_id, "rollback"))
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert back["step"] < CORRUPT_AT, "the script ran ahead of the commands: nothing below holds"
    final = json.loads(out.strip().splitlines()[-1])
    assert final["iter_num"] == MAX_ITERS

    # reduce_lr held for every later update, though the script assigns its LR every
    # iteration and a rollback restored the optimizer: lr/group* is the LR each update used.
    get_lr = script_module().get_lr
    for group in (0, 1):
        logged = server.get(f"/api/v1/runs/{run_id}/scalars?key=lr/group{group}&max_points=100000")
        assert logged["steps"][0] == 0 and logged["steps"][-1] == MAX_ITERS - 1
        for step, lr in zip(logged["steps"], logged["values"], strict=True):
            want = get_lr(step) * (0.5 if step >= cut["step"] else 1.0)
            assert lr == pytest.approx(want, rel=1e-9), (group, step)

    # The optimizer's own update count (AdamW's step, saved by the script): every iteration
    # updated once, except the two skipped ones and the rollback's own step, and the rollback
    # set the count back to what it was at the snapshot.
    restored = back["detail"]["restored_step"]
    assert restored % SNAPSHOT_EVERY == 0 and restored < back["step"]
    skipped = {skip["step"], skip["step"] + 1}
    assert max(skipped) < back["step"]
    at_snapshot = restored - len({s for s in skipped if s < restored})
    assert final["optimizer_updates"] == at_snapshot + (MAX_ITERS - 1 - back["step"])

    # The corrupted batch pages once, at its own step; nothing else pages.
    def settled() -> list[dict[str, Any]] | None:
        got: list[dict[str, Any]] = server.get(f"/api/v1/alerts?run_id={run_id}&limit=100")
        return got if server.get(f"/api/v1/runs/{run_id}")["status"] == "finished" else None

    alerts = until(settled, 30, "the run to finish")
    critical = sorted((a["rule"], a["first_step"]) for a in alerts if a["severity"] == "critical")
    assert critical == [("loss-spike", CORRUPT_AT)], alerts

    # Resumed from its checkpoint, the script goes on with its own iteration numbers.
    resumed = start(server, tmp_path, "--init_from=resume", f"--max_iters={MAX_ITERS + 30}")
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out
    again = until(lambda: run_named(server, "gpt-resume"), 30, "the resumed run")
    loss = server.get(f"/api/v1/runs/{again['id']}/scalars?key=loss")
    assert loss["steps"] == list(range(MAX_ITERS, MAX_ITERS + 30))
    assert max(loss["values"]) < 2.0  # it learned before: the checkpoint came back, not a fresh model
