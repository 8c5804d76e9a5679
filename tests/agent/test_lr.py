"""reduce_lr keeps the schedule's shape: after scaling at step k, every later LR equals the
untouched schedule's LR times the factor, for the schedulers people use."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from trimtab.lr import current_lrs, scale_lr

STEPS, FACTOR = 60, 0.1


def _hf_cosine(opt: torch.optim.Optimizer) -> Any:
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=STEPS)


SCHEDULES: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "LambdaLR warm-up": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 10)),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40, eta_min=1e-4),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=STEPS + 1),
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
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=9),
}


def _trajectory(make: Callable[[torch.optim.Optimizer], Any], scale_at: int | None) -> list[list[float]]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    groups: list[dict[str, Any]] = [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.02}]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    sched = make(opt)
    lrs = []
    for step in range(STEPS):
        if step == scale_at:
            scale_lr(opt, sched, FACTOR)
        lrs.append(current_lrs(opt))
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("at", [5, 23])  # during warm-up, and after it
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_later_lr_is_the_old_schedule_times_the_factor(name: str, at: int) -> None:
    plain = _trajectory(SCHEDULES[name], None)
    scaled = _trajectory(SCHEDULES[name], at)
    assert scaled[:at] == plain[:at]
    for step in range(at, STEPS):
        for got, want in zip(scaled[step], plain[step], strict=True):
            assert got == pytest.approx(want * FACTOR, rel=1e-9, abs=1e-15), (name, step)
    assert len({round(lrs[0], 12) for lrs in plain}) > 3  # the schedule really moves


def test_without_a_scheduler_only_the_groups_change() -> None:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.01)
    scale_lr(opt, None, 0.5)
    assert current_lrs(opt) == [0.005]
    with pytest.raises(ValueError):
        scale_lr(opt, None, 0.0)


def test_a_tensor_lr_is_scaled_in_place() -> None:
    lr = torch.tensor(0.01)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    scale_lr(opt, None, 0.5)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.005)
