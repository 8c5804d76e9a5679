"""LR commands hold whoever owns the LR, checked black-box: with plain SGD the weight change
of each step is ``-lr_used * grad``, so the LR an update really used is read off the weights.

After ``reduce_lr`` at step k every update uses the owner's LR (a scheduler's, or one the
script assigns every iteration) x the factor, so the schedule keeps its shape; the owner's
own LR (the param groups, ``get_last_lr()``) is untouched. ``set_lr`` overrides whatever the
owner sets. The plan survives the owner's assignments and a rollback.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from trimtab.control import Controller, Target, wrap_optimizer_step
from trimtab.lr import LrPlan, applied
from trimtab.protocol import Command
from trimtab.snapshots import Snapshots

STEPS, FACTOR = 60, 0.1


def _hf_cosine(opt: torch.optim.Optimizer) -> Any:
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=STEPS)


SCHEDULES: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR warm-up": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 10)),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40, eta_min=1e-4),
    # cycle_momentum=False: plain SGD has no momentum (and dW = -lr * grad only without it)
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.5, total_steps=STEPS + 1, cycle_momentum=False
    ),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [
            torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=10),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50, eta_min=1e-3),
        ],
        milestones=[10],
    ),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.97),
    "HF cosine with warm-up": _hf_cosine,
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(
        o, base_lr=0.01, max_lr=0.1, step_size_up=9, cycle_momentum=False
    ),
}


def lr_used(before: torch.Tensor, after: torch.Tensor, grad: torch.Tensor) -> float:
    """The LR of a plain SGD update, read off the weights: dW = -lr * grad."""
    i = int(grad.abs().argmax())
    return float((before.reshape(-1)[i] - after.reshape(-1)[i]) / grad.reshape(-1)[i])


class Loop:
    """A model with two param groups under plain SGD, the controller wired as run.watch does."""

    def __init__(self, lr: float = 0.1) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 2).double()  # float64: the LR read off the weights to 1e-12
        groups: list[dict[str, Any]] = [{"params": [self.model.weight]}, {"params": [self.model.bias], "lr": lr / 5}]
        self.opt = torch.optim.SGD(groups, lr=lr)
        self.control = Controller()
        self.control.attach(Target(self.model, self.opt))
        wrap_optimizer_step(self.opt, self.control)
        self.logged: dict[int, dict[int, float]] = {}
        self.control.on_lr_used(lambda step, lrs: self.logged.__setitem__(step, lrs))

    def command(self, ident: str, kind: str, **args: Any) -> None:
        self.control.receive(Command(ident, kind, args))

    def step(self, step: int) -> list[float]:
        """One training step; the LR each group's update used, read off the weights."""
        x = torch.randn(8, 3, dtype=torch.float64)
        self.model(x).pow(2).mean().backward()  # type: ignore[no-untyped-call]
        self.control.boundary(step)
        params = [self.model.weight, self.model.bias]
        before = [p.detach().clone() for p in params]
        grads = [p.grad.detach().clone() for p in params if p.grad is not None]
        self.opt.step()
        self.opt.zero_grad()
        return [lr_used(b, p.detach(), g) for b, p, g in zip(before, params, grads, strict=True)]


def trajectory(make: Callable[[torch.optim.Optimizer], Any], reduce_at: int | None) -> tuple[list[Any], list[Any]]:
    """(LR used per step and group, the scheduler's own LR per step and group)."""
    loop = Loop()
    sched = make(loop.opt)
    used, owned = [], []
    for step in range(STEPS):
        if step == reduce_at:
            loop.command("r", "reduce_lr", factor=FACTOR)
        used.append(loop.step(step))
        owned.append(sched.get_last_lr())
        sched.step()
    assert all(loop.logged[s] == pytest.approx(dict(enumerate(used[s])), rel=1e-9) for s in range(STEPS))
    return used, owned


@pytest.mark.parametrize("at", [5, 23])  # during warm-up, and after it
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_later_update_uses_the_schedule_times_the_factor(name: str, at: int) -> None:
    plain, plain_owned = trajectory(SCHEDULES[name], None)
    reduced, reduced_owned = trajectory(SCHEDULES[name], at)
    assert reduced_owned == plain_owned  # the schedule itself is not bent
    for step in range(STEPS):
        want = FACTOR if step >= at else 1.0
        for got, plain_lr in zip(reduced[step], plain[step], strict=True):
            assert got == pytest.approx(plain_lr * want, rel=1e-9, abs=1e-12), (name, step)
    assert len({round(lrs[0], 9) for lrs in plain}) > 3  # the schedule really moves


def nanogpt_lr(step: int) -> float:
    """Warm-up then cosine, assigned by the script every iteration (nanoGPT's get_lr)."""
    if step < 10:
        return 0.1 * (step + 1) / 10
    return 0.01 + 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 10) / 40))) * 0.09


def test_a_script_that_assigns_the_lr_every_iteration_cannot_undo_a_command() -> None:
    loop = Loop()
    used = []
    for step in range(40):
        for i, group in enumerate(loop.opt.param_groups):
            group["lr"] = nanogpt_lr(step) / (1 if i == 0 else 5)  # the script owns the LR
        if step == 15:
            loop.command("r", "reduce_lr", factor=0.5)
        if step == 30:
            loop.command("s", "set_lr", lr=0.004)
        used.append(loop.step(step))
        assert loop.opt.param_groups[0]["lr"] == nanogpt_lr(step)  # the script's value, back after the step
    for step in range(40):
        want = nanogpt_lr(step) * (0.5 if step >= 15 else 1.0)
        if step >= 30:
            want = 0.004  # an override: the script's later values no longer matter
        assert used[step][0] == pytest.approx(want, rel=1e-9), step
        assert used[step][1] == pytest.approx(used[step][0] / 5, rel=1e-9)  # the groups keep their ratio
        assert loop.logged[step][0] == pytest.approx(want, rel=1e-9)


def test_the_plan_survives_a_rollback(tmp_path: Any) -> None:
    loop = Loop()
    loop.control.snapshots = Snapshots(5, 3, None)
    for step in range(12):
        loop.control.snapshots.maybe_take(step, loop.control.target)
        if step == 8:
            loop.command("r", "reduce_lr", factor=0.5)
        if step == 10:
            loop.command("b", "rollback", to_step=5)
        used = loop.step(step)
    assert used[0] == pytest.approx(0.05, rel=1e-9)  # the optimizer state came back, the cut stayed
    (back,) = [h for h in loop.control.history if h["id"] == "b"]
    assert back["detail"]["lr_after"] == pytest.approx([0.05, 0.01])


def test_the_rollback_step_logs_the_lr_its_dropped_update_would_have_used() -> None:
    """The script's LR of that step with the cut, not the LR the restored optimizer brought
    back from the snapshot (which the script overwrites at its next iteration)."""
    loop = Loop()
    loop.control.snapshots = Snapshots(5, 3, None)
    for step in range(12):
        for group, base in zip(loop.opt.param_groups, (0.1, 0.02), strict=True):
            group["lr"] = base * (1 + step)  # the script owns the LR: a different one every step
        loop.control.snapshots.maybe_take(step, loop.control.target)
        if step == 8:
            loop.command("r", "reduce_lr", factor=0.5)
        if step == 10:
            loop.command("b", "rollback", to_step=5)
        loop.step(step)
    assert loop.logged[10] == pytest.approx({0: 0.1 * 11 * 0.5, 1: 0.02 * 11 * 0.5})
    assert loop.logged[11] == pytest.approx({0: 0.1 * 12 * 0.5, 1: 0.02 * 12 * 0.5})


def test_reduce_lr_with_min_lr_and_a_later_set_lr() -> None:
    loop = Loop(lr=0.01)
    loop.command("a", "reduce_lr", factor=0.01, min_lr=0.005)
    loop.command("b", "reduce_lr", factor=0.5, min_lr=0.005)
    assert loop.step(0)[0] == pytest.approx(0.005, rel=1e-9)
    first, second = [h for h in loop.control.history if h["id"] in ("a", "b")]
    assert first["detail"]["factor"] == 0.5 and first["detail"]["after"] == pytest.approx([0.005, 0.001])
    assert second["status"] == "rejected" and "already at or below min_lr" in second["detail"]["reason"]
    loop.command("c", "set_lr", lr=0.02)
    loop.command("d", "reduce_lr", factor=0.5)  # multiplies the override
    assert loop.step(1) == pytest.approx([0.01, 0.002], rel=1e-9)


def test_set_lr_at_the_start_of_a_warm_up_sets_every_group() -> None:
    loop = Loop()
    for group in loop.opt.param_groups:
        group["lr"] = 0.0
    loop.command("s", "set_lr", lr=0.03)
    assert loop.step(0) == pytest.approx([0.03, 0.03], rel=1e-9)


def test_a_tensor_lr_keeps_its_identity_and_value() -> None:
    lr = torch.tensor(0.01)
    param = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([param], lr=lr)
    plan = LrPlan()
    plan.reduce(0.5)
    with applied(opt, plan):
        seen = opt.param_groups[0]["lr"]
        assert isinstance(seen, torch.Tensor) and float(seen) == pytest.approx(0.005)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.01)


def test_an_lr_the_step_itself_assigns_is_kept() -> None:
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([param], lr=0.1)
    plan = LrPlan()
    plan.reduce(0.5)
    with applied(opt, plan):
        opt.param_groups[0]["lr"] = 0.7  # an optimizer that adapts its own LR (D-Adaptation and friends)
    assert opt.param_groups[0]["lr"] == 0.7


def test_the_autopilots_cap_holds_under_a_rising_owner_lr_and_set_lr_lifts_it() -> None:
    loop = Loop()
    loop.control.lr.cap([0.05, 0.01])  # as the autopilot does after a rollback
    for group in loop.opt.param_groups:
        group["lr"] = 10.0  # the script keeps re-creating an LR fault
    assert loop.step(0) == pytest.approx([0.05, 0.01], rel=1e-9)
    loop.command("r", "reduce_lr", factor=0.5)  # a cut scales the cap too, or it would do nothing
    assert loop.step(1) == pytest.approx([0.025, 0.005], rel=1e-9)
    loop.command("s", "set_lr", lr=0.2)  # a person takes over: no cap
    assert loop.step(2) == pytest.approx([0.2, 0.2], rel=1e-9)
    assert loop.control.lr.ceiling is None


def test_a_tensor_lr_is_capped_on_its_device() -> None:
    lr = torch.tensor(0.5)
    param = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([param], lr=lr)
    plan = LrPlan(ceiling=[0.1])
    with applied(opt, plan):
        put = opt.param_groups[0]["lr"]
        assert isinstance(put, torch.Tensor) and float(put) == pytest.approx(0.1)
    assert opt.param_groups[0]["lr"] is lr
