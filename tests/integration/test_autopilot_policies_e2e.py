"""Autopilot policies end to end: a person sets a policy on a real server (SQLite and
PostgreSQL), the real agent in a real torch loop turns its autopilot on (or off) at a step
boundary, and the autopilot then rejects a NaN update, reported with ``source: autopilot``."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import torch

from tests.helpers import ServerProcess, wait_until
from tests.integration.test_commands_e2e import Trainer, final

# Only the non-finite check acts: no spike or LR action can blur what the test looks at.
POLICY = {"enabled": True, "skip_spikes": False, "reduce_lr": False}


def write(server: ServerProcess, method: str, path: str, body: Any = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        server.url + "/api/v1" + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


def poisonable(trainer: Trainer) -> dict[str, int]:
    """A forward hook that makes the step ``poisoned["step"]``'s output (so its loss) NaN."""
    poisoned = {"step": -1}

    def poison(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * float("nan") if trainer.step_no == poisoned["step"] else output

    trainer.first.register_forward_hook(poison)
    return poisoned


def poison_next(trainer: Trainer, poisoned: dict[str, int]) -> int:
    poisoned["step"] = target = trainer.step_no + 2
    wait_until(lambda: trainer.step_no > target + 2, 30, "the poisoned step")
    return target


def autopilot_reports(server: ServerProcess, run_id: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = server.get(f"/api/v1/runs/{run_id}/commands?source=autopilot")
    return got


def test_a_project_policy_set_before_the_run_turns_its_autopilot_on_at_the_first_step(
    server: ServerProcess, tmp_path: Path
) -> None:
    write(server, "PUT", "/projects/control/autopilot", POLICY)
    trainer = Trainer(server, tmp_path, "from-project")  # project "control"; no autopilot in the script
    poisoned = poisonable(trainer)
    run_id = trainer.agent.wait_for_id(30)
    assert run_id is not None
    try:
        (policy_cmd,) = server.get(f"/api/v1/runs/{run_id}/commands")
        assert (policy_cmd["kind"], policy_cmd["args"], policy_cmd["created_by"]) == ("set_autopilot", POLICY, "policy")
        # the agent holds it before the loop starts, so the first boundary applies it
        wait_until(
            lambda: server.get(f"/api/v1/runs/{run_id}/commands/{policy_cmd['id']}")["status"] == "delivered",
            30,
            "the policy's delivery",
        )
        trainer.start()
        done = final(server, run_id, policy_cmd["id"])
        assert (done["status"], done["step"], done["source"]) == ("applied", 0, "human")
        assert done["detail"]["enabled"] is True and done["detail"]["options"] == {
            "skip_spikes": False,
            "reduce_lr": False,
        }

        wait_until(lambda: trainer.step_no > 30, 30, "training past warm-up")
        target = poison_next(trainer, poisoned)
        assert torch.isfinite(trainer.first.weight).all()  # the NaN update was rejected
        wait_until(lambda: bool(autopilot_reports(server, run_id)), 30, "the autopilot's report")
        (report,) = autopilot_reports(server, run_id)
        assert (report["kind"], report["step"], report["status"]) == ("skip_batches", target, "applied")
        assert report["source"] == "autopilot" and report["created_by"] == "autopilot"
        assert "non-finite" in report["detail"]["reason"]
    finally:
        trainer.max_steps = 0
        trainer.join(30)
        trainer.agent.finish(timeout=30)


def test_a_run_policy_reaches_the_running_agent_and_removing_it_turns_the_autopilot_off(
    server: ServerProcess, tmp_path: Path
) -> None:
    trainer = Trainer(server, tmp_path, "from-run")
    poisoned = poisonable(trainer)
    trainer.start()
    run_id = trainer.agent.wait_for_id(30)
    assert run_id is not None
    try:
        wait_until(lambda: trainer.step_no > 30, 30, "training to start")
        assert server.get(f"/api/v1/runs/{run_id}/commands") == []  # no policy, nothing sent

        put = write(server, "PUT", f"/runs/{run_id}/autopilot", POLICY)
        (sent,) = put["commands"]
        on = final(server, run_id, sent["id"])
        assert on["status"] == "applied" and on["detail"]["enabled"] is True and on["created_by"] != "policy"
        target = poison_next(trainer, poisoned)
        assert torch.isfinite(trainer.first.weight).all()
        wait_until(lambda: bool(autopilot_reports(server, run_id)), 30, "the autopilot's report")
        (report,) = autopilot_reports(server, run_id)
        assert (report["kind"], report["step"], report["source"]) == ("skip_batches", target, "autopilot")

        # no project policy to fall back to: the autopilot is turned off, and a NaN goes through
        gone = write(server, "DELETE", f"/runs/{run_id}/autopilot")
        assert gone["source"] == "none" and gone["commands"][0]["args"] == {"enabled": False}
        off = final(server, run_id, gone["commands"][0]["id"])
        assert off["status"] == "applied" and off["detail"]["enabled"] is False
        poison_next(trainer, poisoned)
        assert not torch.isfinite(trainer.first.weight).all()
    finally:
        trainer.max_steps = 0
        trainer.join(30)
        trainer.agent.finish(timeout=30)
