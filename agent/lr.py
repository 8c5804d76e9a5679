"""Scaling a running job's learning rate without bending its schedule.

``scale_lr(optimizer, scheduler, factor)`` multiplies the LR now and every LR the schedule
will produce later by ``factor``. torch schedulers compute the next LR either in closed form
from ``base_lrs`` (LambdaLR, so Hugging Face's warm-up + cosine, StepLR, ...), or
recursively from each group's current ``lr`` and their own constants (CosineAnnealingLR's
``eta_min``), or from values kept in the param groups (OneCycleLR's ``initial_lr``,
``max_lr``, ``min_lr``). Every such value is linear in the LR, so scaling all of them scales
the whole trajectory: for every later step, new LR = old LR x factor. Composite schedulers
(SequentialLR, ChainedScheduler) are scaled through their children, and a wrapper that
holds the real scheduler as ``.scheduler`` (accelerate's AcceleratedScheduler) through it.

Nothing here imports torch at module level; the objects are duck-typed.
"""

from __future__ import annotations

from typing import Any

# LR-valued entries of a param group (OneCycleLR and friends keep theirs there).
GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# LR-valued attributes of a scheduler: lists (one per group) or single numbers.
SCHEDULER_LISTS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs")
SCHEDULER_NUMBERS = ("eta_min",)


def current_lrs(optimizer: Any) -> list[float]:
    return [float(_number(group["lr"])) for group in optimizer.param_groups]


def scale_lr(optimizer: Any, scheduler: Any, factor: float) -> None:
    """Multiply the LR and the rest of its schedule by ``factor`` (> 0)."""
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    for group in optimizer.param_groups:
        for key in GROUP_KEYS:
            if key in group:
                group[key] = _scaled(group[key], factor)
    seen: set[int] = set()
    if scheduler is not None:
        _scale_scheduler(scheduler, factor, seen)


def _scale_scheduler(scheduler: Any, factor: float, seen: set[int]) -> None:
    if id(scheduler) in seen:
        return
    seen.add(id(scheduler))
    for name in SCHEDULER_LISTS:
        values = getattr(scheduler, name, None)
        if isinstance(values, list):
            setattr(scheduler, name, [_scaled(v, factor) for v in values])
    for name in SCHEDULER_NUMBERS:
        value = getattr(scheduler, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(scheduler, name, value * factor)
    for child in getattr(scheduler, "_schedulers", None) or ():
        _scale_scheduler(child, factor, seen)
    inner = getattr(scheduler, "scheduler", None)  # accelerate's AcceleratedScheduler wraps one
    if inner is not None and inner is not scheduler:
        _scale_scheduler(inner, factor, seen)


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * factor
    mul = getattr(value, "mul_", None)  # an LR held as a tensor: scale in place, keep its identity
    if callable(mul):
        mul(factor)
        return value
    return value


def _number(value: Any) -> float:
    item = getattr(value, "item", None)
    return float(item()) if callable(item) else float(value)
