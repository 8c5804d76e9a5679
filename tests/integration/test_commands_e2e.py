"""Commands end to end: a person POSTs to a real server (SQLite and PostgreSQL), the real agent
in a real torch training loop applies each command at a step boundary, and the server shows
the result with the step where it took effect."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import trimtab
from tests.helpers import ServerProcess, wait_until

WARMUP = 20


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        server.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class Trainer(threading.Thread):
    """A real training loop on its own thread, recording per step what the optimizer did."""

    def __init__(
        self,
        server: ServerProcess,
        tmp_path: Path,
        name: str,
        schedule: Callable[[torch.optim.Optimizer], Any] | None = None,
        **watch: Any,
    ) -> None:
        super().__init__(daemon=True)
        self.agent = trimtab.init(
            server=server.url, project="control", name=name, spool_dir=str(tmp_path / name), replay_orphans=False
        )
        torch.manual_seed(0)
        self.first = nn.Linear(4, 16)
        self.model = nn.Sequential(self.first, nn.ReLU(), nn.Linear(16, 1))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.01, weight_decay=0.0)
        warmup = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / WARMUP))  # noqa: E731
        self.sched = (schedule or warmup)(self.opt)
        self.agent.watch(self.model, self.opt, self.sched, sample_every=1000, **watch)
        self.lrs: dict[int, float] = {}
        self.weights: dict[int, torch.Tensor] = {}
        self.stopped_at: int | None = None
        self.step_no = 0
        self.max_steps = 100_000
        self.pace = 0.01

    def run(self) -> None:
        g = torch.Generator().manual_seed(1)
        while self.step_no < self.max_steps:
            step = self.step_no
            x = torch.randn(16, 4, generator=g)
            loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            loss.backward()  # type: ignore[no-untyped-call]
            self.agent.step(loss, step=step)  # commands take effect here
            self.lrs[step] = self.agent.learning_rates()[0]  # what this step's update uses
            self.weights[step] = self.first.weight.detach().clone()
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad()
            self.step_no += 1
            if self.agent.should_stop():
                self.stopped_at = step
                return
            time.sleep(self.pace)


def send(server: ServerProcess, run_id: int, kind: str, **args: Any) -> dict[str, Any]:
    status, body = post(server, f"/api/v1/runs/{run_id}/commands", {"kind": kind, "args": args})
    assert status == 201, body
    return body  # type: ignore[no-any-return]


def final(server: ServerProcess, run_id: int, command_id: str, timeout: float = 30) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        got: dict[str, Any] = server.get(f"/api/v1/runs/{run_id}/commands/{command_id}")
        return got

    wait_until(lambda: get()["status"] in ("applied", "rejected", "expired"), timeout, f"command {command_id}")
    return get()


def started(server: ServerProcess, tmp_path: Path, name: str, **watch: Any) -> tuple[Trainer, int]:
    trainer = Trainer(server, tmp_path, name, **watch)
    trainer.start()
    run_id = trainer.agent.wait_for_id(30)
    assert run_id is not None
    wait_until(lambda: trainer.step_no > WARMUP // 2, 30, "training to start")
    return trainer, run_id


def test_every_command_kind_end_to_end(server: ServerProcess, tmp_path: Path) -> None:
    trainer, run_id = started(server, tmp_path, "every-kind", snapshot_every=5, snapshot_keep=4)
    saved: list[int] = []

    def checkpoint(step: int) -> str:
        saved.append(step)
        return f"ckpt-{step}"

    trainer.agent.on_checkpoint(checkpoint)
    trainer.agent.on_command("shout", lambda args: {"heard": args["word"].upper()})
    try:
        # reduce_lr during warm-up: every later LR is the schedule's times 0.5
        cmd = final(server, run_id, send(server, run_id, "reduce_lr", factor=0.5)["id"])
        at = cmd["step"]
        assert cmd["status"] == "applied" and cmd["source"] == "human" and cmd["ranks"]["0"]["status"] == "applied"
        assert at is not None and at > 0 and cmd["detail"]["factor"] == 0.5
        wait_until(lambda: trainer.step_no > WARMUP + 5, 30, "training past warm-up")
        planned: Callable[[int], float] = lambda s: 0.01 * min(1.0, (s + 1) / WARMUP)  # noqa: E731
        assert trainer.lrs[at - 1] == planned(at - 1)
        for s in range(at, trainer.step_no - 1):
            assert abs(trainer.lrs[s] - 0.5 * planned(s)) < 1e-12, s

        cmd = final(server, run_id, send(server, run_id, "set_hparams", weight_decay=0.05)["id"])
        assert cmd["status"] == "applied" and trainer.opt.param_groups[0]["weight_decay"] == 0.05

        cmd = final(server, run_id, send(server, run_id, "skip_batches", n=3)["id"])
        at = cmd["step"]
        wait_until(lambda: trainer.step_no > at + 4, 30, "steps after the skip")
        w = trainer.weights
        assert torch.equal(w[at], w[at + 1]) and torch.equal(w[at + 1], w[at + 2]) and torch.equal(w[at + 2], w[at + 3])
        assert not torch.equal(w[at + 3], w[at + 4])  # the 4th update is applied again

        cmd = final(server, run_id, send(server, run_id, "shout", word="hi")["id"])
        assert cmd["status"] == "applied" and cmd["detail"]["result"] == {"heard": "HI"}
        cmd = final(server, run_id, send(server, run_id, "no_such_thing")["id"])
        assert cmd["status"] == "rejected" and "run.on_command('no_such_thing'" in cmd["detail"]["reason"]

        cmd = final(server, run_id, send(server, run_id, "checkpoint")["id"])
        assert cmd["status"] == "applied" and saved == [cmd["step"]]

        target = trainer.step_no - 8
        cmd = final(server, run_id, send(server, run_id, "rollback", to_step=target)["id"])
        restored = cmd["detail"]["restored_step"]
        assert cmd["status"] == "applied" and restored <= target and restored % 5 == 0
        wait_until(lambda: trainer.step_no > cmd["step"] + 2, 30, "a step after the rollback")
        assert torch.equal(trainer.weights[cmd["step"] + 1], trainer.weights[restored])

        cmd = final(server, run_id, send(server, run_id, "pause")["id"])
        held = trainer.step_no
        time.sleep(1.0)
        assert trainer.step_no == held and cmd["step"] == held  # waiting at the boundary
        run = server.get(f"/api/v1/runs/{run_id}")
        assert run["status"] == "running"  # heartbeats go on while paused
        cmd = final(server, run_id, send(server, run_id, "resume")["id"])
        assert cmd["status"] == "applied" and cmd["step"] == held
        wait_until(lambda: trainer.step_no > held + 2, 30, "training to go on")

        cmd = final(server, run_id, send(server, run_id, "stop")["id"])
        trainer.join(30)
        assert cmd["status"] == "applied" and trainer.stopped_at == cmd["step"] and saved[-1] == cmd["step"]

        history = server.get(f"/api/v1/runs/{run_id}/commands?limit=100")
        kinds = [c["kind"] for c in history]
        assert set(kinds) >= {"reduce_lr", "set_hparams", "skip_batches", "shout", "checkpoint", "rollback", "stop"}
    finally:
        trainer.max_steps = 0
        trainer.join(30)
        trainer.agent.finish(timeout=30)


def test_a_command_for_an_offline_agent_waits_and_is_applied_on_reconnect(
    server: ServerProcess, tmp_path: Path
) -> None:
    trainer, run_id = started(server, tmp_path, "offline")
    try:
        server.kill()
        server.start()
        # the agent reconnects with backoff; meanwhile the command is stored, pending
        cmd = send(server, run_id, "reduce_lr", factor=0.1)
        assert cmd["status"] in ("pending", "delivered")
        done = final(server, run_id, cmd["id"], timeout=60)
        assert done["status"] == "applied" and trainer.lrs[done["step"]] < trainer.lrs[done["step"] - 1]
    finally:
        trainer.max_steps = 0
        trainer.join(30)
        trainer.agent.finish(timeout=30)


def test_bad_commands_get_a_clear_4xx(server: ServerProcess, tmp_path: Path) -> None:
    trainer, run_id = started(server, tmp_path, "bad")
    try:
        for body, code in [
            ({"kind": "reduce_lr", "args": {"factor": 2}}, 422),
            ({"kind": "reduce_lr", "args": {}}, 422),
            ({"kind": "skip_batches", "args": {"n": -1}}, 422),
            ({"kind": "Bad Kind!", "args": {}}, 422),
        ]:
            status, answer = post(server, f"/api/v1/runs/{run_id}/commands", body)
            assert status == code and answer["error"]["message"], (body, answer)
        status, _ = post(server, "/api/v1/runs/999999/commands", {"kind": "pause", "args": {}})
        assert status == 404
        cmd = final(server, run_id, send(server, run_id, "rollback")["id"])  # no snapshots kept
        assert cmd["status"] == "rejected" and "snapshot_every" in cmd["detail"]["reason"]
    finally:
        trainer.max_steps = 0
        trainer.join(30)
        trainer.agent.finish(timeout=30)


def test_autopilot_actions_are_recorded_and_alerted_like_commands(server: ServerProcess, tmp_path: Path) -> None:
    trainer = Trainer(server, tmp_path, "autopilot")
    trainer.agent.autopilot()
    poisoned = {"step": -1}
    first = trainer.first

    def poison(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        if trainer.step_no == poisoned["step"]:
            return output * float("nan")
        return output

    first.register_forward_hook(poison)
    trainer.start()
    run_id = trainer.agent.wait_for_id(30)
    assert run_id is not None
    try:
        wait_until(lambda: trainer.step_no > 30, 30, "training to start")
        poisoned["step"] = trainer.step_no + 2
        target = poisoned["step"]
        wait_until(lambda: trainer.step_no > target + 2, 30, "the poisoned step")
        assert torch.isfinite(first.weight).all()  # the NaN update was rejected

        def auto() -> list[dict[str, Any]]:
            got: list[dict[str, Any]] = server.get(f"/api/v1/runs/{run_id}/commands?source=autopilot")
            return got

        wait_until(lambda: bool(auto()), 30, "the autopilot's report")
        (cmd,) = auto()
        assert cmd["kind"] == "skip_batches" and cmd["step"] == target and cmd["created_by"] == "autopilot"
        assert cmd["status"] == "applied" and "non-finite" in cmd["detail"]["reason"]

        def alerted() -> list[dict[str, Any]]:
            return [a for a in server.get(f"/api/v1/runs/{run_id}/alerts") if a["rule"] == "autopilot-acted"]

        wait_until(lambda: bool(alerted()), 30, "the autopilot-acted alert")
        assert alerted()[0]["first_step"] == target and "autopilot" in alerted()[0]["remedy"]
    finally:
        trainer.max_steps = 0
        trainer.join(30)
        trainer.agent.finish(timeout=30)


def _schedules() -> dict[str, Callable[[torch.optim.Optimizer], Any]]:
    from transformers import get_cosine_schedule_with_warmup

    lr = torch.optim.lr_scheduler
    return {
        "LambdaLR": lambda o: lr.LambdaLR(o, lambda s: min(1.0, (s + 1) / WARMUP)),
        "CosineAnnealingLR": lambda o: lr.CosineAnnealingLR(o, T_max=200, eta_min=1e-4),
        "OneCycleLR": lambda o: lr.OneCycleLR(o, max_lr=0.05, total_steps=100_000),
        "SequentialLR": lambda o: lr.SequentialLR(
            o, [lr.LinearLR(o, 0.1, total_iters=WARMUP), lr.CosineAnnealingLR(o, T_max=200)], milestones=[WARMUP]
        ),
        "HF cosine with warm-up": lambda o: get_cosine_schedule_with_warmup(o, WARMUP, 400),
    }


@pytest.mark.parametrize(
    "name", ["LambdaLR", "CosineAnnealingLR", "OneCycleLR", "SequentialLR", "HF cosine with warm-up"]
)
def test_reduce_lr_keeps_each_schedules_shape(server: ServerProcess, tmp_path: Path, name: str) -> None:
    """Through the server, for every schedule the issue lists: every LR after the command is
    the untouched schedule's times the factor (the twin runs the same schedule unscaled)."""
    make = _schedules()[name]
    trainer = Trainer(server, tmp_path, f"sched-{name}", schedule=make)
    twin_opt = torch.optim.AdamW(nn.Linear(1, 1).parameters(), lr=0.01)
    twin = make(twin_opt)
    planned = []
    for _ in range(2000):
        planned.append(twin_opt.param_groups[0]["lr"])
        twin_opt.step()
        twin.step()
    trainer.start()
    run_id = trainer.agent.wait_for_id(30)
    assert run_id is not None
    try:
        wait_until(lambda: trainer.step_no > 5, 30, "training to start")
        cmd = final(server, run_id, send(server, run_id, "reduce_lr", factor=0.3)["id"])
        at = cmd["step"]
        wait_until(lambda: trainer.step_no > at + 30, 60, "30 steps after the command")
        assert cmd["status"] == "applied"
        for s in range(at):
            assert trainer.lrs[s] == pytest.approx(planned[s], rel=1e-12), (name, s)
        for s in range(at, at + 30):
            assert trainer.lrs[s] == pytest.approx(0.3 * planned[s], rel=1e-9), (name, s)
    finally:
        trainer.max_steps = 0
        trainer.join(30)
        trainer.agent.finish(timeout=30)
