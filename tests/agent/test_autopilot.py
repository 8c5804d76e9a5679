"""The autopilot on real torch loops (offline runs: the agent spools, no server needed):
it rejects bad updates at once, respects its caps, escalates, rolls back on divergence and
leaves a healthy run alone."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import trimtab
from tests.helpers import free_port
from trimtab.protocol import Command


@pytest.fixture
def run(tmp_path: Path) -> Iterator[trimtab.Run]:
    r = trimtab.init(
        server=f"http://127.0.0.1:{free_port()}", project="t", spool_dir=str(tmp_path / "spool"), replay_orphans=False
    )
    yield r
    r.finish(timeout=0.5)


def task(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train(
    run: trimtab.Run, model: nn.Module, opt: torch.optim.Optimizer, steps: range, fault: Any = None
) -> list[float]:
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in steps:
        x = torch.randn(32, 8, generator=g)
        y = x.sum(1, keepdim=True)
        if fault is not None:
            x = fault(step, x)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        run.step(loss, step=step)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def auto(run: trimtab.Run, kind: str | None = None) -> list[dict[str, Any]]:
    return [
        h
        for h in run.command_history()
        if h["detail"].get("source") == "autopilot" and (kind is None or h["kind"] == kind)
    ]


def test_a_healthy_run_is_left_alone(run: trimtab.Run) -> None:
    model, opt = task()
    run.watch(model, opt, sample_every=1000)
    run.autopilot()
    losses = train(run, model, opt, range(400))
    assert auto(run) == [] and losses[-1] < 0.1 * losses[0]


def test_a_nan_batch_is_rejected_before_the_update(run: trimtab.Run) -> None:
    model, opt = task()
    run.watch(model, opt, sample_every=1000)
    run.autopilot()
    train(run, model, opt, range(60))
    weights = [p.detach().clone() for p in model.parameters()]

    def nan_batch(step: int, x: torch.Tensor) -> torch.Tensor:
        x[0, 0] = math.nan
        return x

    train(run, model, opt, range(60, 61), nan_batch)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    (skip,) = auto(run)
    assert skip["kind"] == "skip_batches" and skip["step"] == 60 and "non-finite" in skip["detail"]["reason"]


def test_a_corrupted_batch_spike_is_rejected(run: trimtab.Run) -> None:
    model, opt = task()
    run.watch(model, opt, sample_every=1000)
    run.autopilot()
    train(run, model, opt, range(200), lambda step, x: x * 1000 if step == 150 else x)
    skips = auto(run, "skip_batches")
    assert [s["step"] for s in skips] == [150] and "spike" in skips[0]["detail"]["reason"]


def test_skips_are_capped_then_the_lr_is_reduced(run: trimtab.Run) -> None:
    model, opt = task()
    run.watch(model, opt, sample_every=1000)
    run.autopilot(max_skips_in_row=3, reduce_after=3, lr_factor=0.5)

    def nan_from_80(step: int, x: torch.Tensor) -> torch.Tensor:
        if step >= 80:
            x[0, 0] = math.nan
        return x

    train(run, model, opt, range(80))
    before = run.learning_rates()[0]
    train(run, model, opt, range(80, 86), nan_from_80)
    kinds = [(h["kind"], h["step"], h["detail"].get("over_cap")) for h in auto(run)]
    skips = [(step, over) for kind, step, over in kinds if kind == "skip_batches"]
    # every NaN step is rejected (a NaN update would ruin the weights); from the 4th in a row
    # on they are over the cap, and the autopilot escalates (once: refractory period); the 5th
    # in a row is a streak, and with no snapshot to go back to it cuts the LR again
    assert skips == [(80, False), (81, False), (82, False), (83, True), (84, True), (85, True)]
    assert [(k, s) for k, s, _ in kinds if k == "reduce_lr"] == [("reduce_lr", 82), ("reduce_lr", 84)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert run.learning_rates()[0] == pytest.approx(before * 0.25)
    assert opt.param_groups[0]["lr"] == before  # the cut applies at each step, on top of the script's LR


def test_divergence_rolls_back_to_a_snapshot_before_the_rise(run: trimtab.Run) -> None:
    model, opt = task()
    run.watch(model, opt, sample_every=1000, snapshot_every=50, snapshot_keep=4)
    run.autopilot(skip_spikes=False)
    train(run, model, opt, range(300))
    for group in opt.param_groups:
        group["lr"] = 0.5  # a bad LR change: the loss climbs and stays up
    train(run, model, opt, range(300, 420))
    rollbacks = auto(run, "rollback")
    assert rollbacks, [h["kind"] for h in auto(run)]
    assert rollbacks[0]["detail"]["restored_step"] <= 300
    assert any(h["kind"] == "reduce_lr" and h["step"] == rollbacks[0]["step"] for h in auto(run))


def test_a_policy_from_the_server_turns_it_on_and_off(run: trimtab.Run) -> None:
    model, opt = task()
    run.watch(model, opt, sample_every=1000)
    control = run._control  # as the sender hands over a cmd frame
    control.receive(Command("p1", "set_autopilot", {"enabled": True, "spike_z": 30.0}))
    control.receive(Command("p2", "set_autopilot", {"sneaky": 1}))
    train(run, model, opt, range(3))
    p1, p2 = [h for h in run.command_history() if h["id"] in ("p1", "p2")]
    assert p1["status"] == "applied" and run._autopilot is not None and run._autopilot.opts.spike_z == 30.0
    assert p2["status"] == "rejected" and "unknown option(s) sneaky" in p2["detail"]["reason"]
    control.receive(Command("p3", "set_autopilot", {"enabled": False}))
    train(run, model, opt, range(3, 4))
    assert run._autopilot is None


def test_a_lasting_level_change_is_not_cut_to_nothing(run: trimtab.Run) -> None:
    model, opt = task()
    run.watch(model, opt, sample_every=1000)
    run.autopilot()
    train(run, model, opt, range(150))
    start_lr = opt.param_groups[0]["lr"]
    # from step 150 on, every batch has 30x larger inputs: a new, lasting level (not a spike storm)
    train(run, model, opt, range(150, 900), lambda step, x: x * 30)
    reductions = auto(run, "reduce_lr")
    assert 1 <= len(reductions) <= 3  # capped, and the spike baselines re-learn the new level
    assert opt.param_groups[0]["lr"] >= start_lr * 0.5**3
    late_skips = [h for h in auto(run, "skip_batches") if h["step"] > 400]
    assert late_skips == []  # the new level became normal


def test_a_persistent_nan_from_corrupted_weights_is_rolled_back(run: trimtab.Run) -> None:
    """A weight turned to Inf makes every later loss NaN: rejecting updates forever trains
    nothing. After a streak the autopilot goes back to the snapshot before it and training
    goes on."""
    model, opt = task()
    run.watch(model, opt, sample_every=1000, snapshot_every=10, snapshot_keep=5)
    run.autopilot()
    train(run, model, opt, range(100))
    with torch.no_grad():
        next(model.parameters())[0, 0] = math.inf  # a corrupted weight (a bad write, a flipped bit)
    losses = train(run, model, opt, range(100, 200))
    (back,) = auto(run, "rollback")
    assert back["step"] == 104 and back["detail"]["restored_step"] == 90  # the 5th non-finite step in a row
    assert "5 non-finite steps in a row" in back["detail"]["reason"]
    assert all(math.isfinite(v) for v in losses[5:]) and all(torch.isfinite(p).all() for p in model.parameters())
    assert not run.should_stop() and not auto(run, "stop")


def test_nan_that_no_rollback_cures_ends_in_giving_up_not_rejecting_forever(run: trimtab.Run) -> None:
    """Every batch is NaN from step 100 on (a broken data source): the rollbacks and LR cuts
    do not help, so the autopilot gives up: offline it asks the loop to stop (with a server
    it pauses the run) and says why."""
    model, opt = task()
    run.watch(model, opt, sample_every=1000, snapshot_every=10, snapshot_keep=5)
    run.autopilot(max_lr_reductions=3)

    def broken(step: int, x: torch.Tensor) -> torch.Tensor:
        if step >= 100:
            x[:, 0] = math.nan
        return x

    g = torch.Generator().manual_seed(1)
    stopped_at = None
    for step in range(400):
        x = broken(step, torch.randn(32, 8, generator=g))
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        run.step(loss, step=step)
        opt.step()
        opt.zero_grad()
        if run.should_stop():
            stopped_at = step
            break
    kinds = [h["kind"] for h in auto(run) if h["kind"] != "skip_batches"]
    # the skip cap cuts the LR once; the streak rolls back (and cuts); a relapse 5 steps later
    # rolls back and cuts again; the next finds the 3 cuts spent and gives up
    assert kinds == ["reduce_lr", "rollback", "reduce_lr", "rollback", "reduce_lr", "stop"], kinds
    (gave_up,) = auto(run, "stop")
    assert gave_up["detail"]["gave_up"] and "no LR cut left" in gave_up["detail"]["reason"]
    assert stopped_at == gave_up["step"] < 130
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_run_with_a_server_is_paused_when_the_autopilot_gives_up() -> None:
    from trimtab.autopilot import Autopilot, AutopilotOptions
    from trimtab.control import Controller, Target

    model, opt = task()
    control = Controller()
    control.attach(Target(model, opt))
    pilot = Autopilot(control, AutopilotOptions(max_lr_reductions=0), connected=lambda: True)
    for step in range(5):
        pilot.decide(step, math.nan, 1.0, amp=False)
    assert control.paused and not control.stop_requested
    (entry,) = [h for h in control.history if h["kind"] == "pause"]
    assert entry["step"] == 4 and entry["detail"]["gave_up"]


def test_a_script_owned_lr_fault_is_cut_until_the_run_recovers(run: trimtab.Run) -> None:
    """The script sets its LR every iteration and from step 300 on sets it 100x too high: a
    rollback alone would not help (the script re-creates the fault), nor would halving cuts
    that only scale the script's LR; the rollback caps the LR at the snapshot's, on top of
    whatever the script sets, and the loss comes back down."""
    model, opt = task()
    run.watch(model, opt, sample_every=1000, snapshot_every=10, snapshot_keep=5)
    run.autopilot()
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(700):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (100 if step >= 300 else 1)
        x = torch.randn(32, 8, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        run.step(loss, step=step)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    healthy = sorted(losses[250:300])[25]
    assert auto(run, "rollback") and not auto(run, "stop") and not auto(run, "pause")
    assert sorted(losses[-50:])[25] < 2 * healthy, (healthy, losses[-50:])
    # capped at the LR of the snapshot it went back to (x its cuts), on top of the script's LR
    assert run.learning_rates()[0] <= 1e-2 * 0.5
    assert opt.param_groups[0]["lr"] == 1.0  # the script's own value, untouched
