"""The learning rate that trimtab's commands put in force, whoever owns the LR.

Training scripts own their LR: a scheduler sets it, a framework sets it, or the script
assigns ``param_group["lr"]`` itself every iteration (the idiom of most LLM codebases). A
command that wrote the param groups would last until the next assignment. So a command
does not touch them; it changes an :class:`LrPlan`, and the plan is applied at the moment
of ``optimizer.step()`` (the wrapper in ``control.py``), on top of whatever LR the owner set
for that step:

- ``reduce_lr(factor)`` multiplies: every update uses the owner's LR x the product of the
  factors, so a schedule keeps its shape, only lower;
- ``set_lr(lr)`` overrides: every update uses ``lr`` for param group 0 (other groups keep
  the ratio to group 0 they had when the command came), whatever the owner sets, until the
  next ``set_lr``; a later ``reduce_lr`` multiplies the override.
- the autopilot, after a rollback, caps: no update uses more than the LR of the snapshot it
  went back to (x the cuts since), until a ``set_lr``.

The param groups hold the owner's LR again right after the step, so schedulers that read it
(CosineAnnealingLR's recursive form), ``get_last_lr()`` and the script's own bookkeeping
see their own values. The plan lives in the process, not in the optimizer: a rollback that
restores the optimizer's state keeps it.

Nothing here imports torch at module level; LRs held as tensors are handled duck-typed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class LrPlan:
    factor: float = 1.0  # product of every reduce_lr since the last set_lr
    override: list[float] | None = None  # set_lr: the LR of each param group, in place of the owner's
    # The autopilot after a rollback: each group's LR at most this (the LR the run used at the
    # snapshot it went back to, x the cuts since), so a fault the owner keeps re-creating
    # (a schedule or script setting the LR 100x too high) cannot come back. set_lr lifts it.
    ceiling: list[float] | None = None

    @property
    def active(self) -> bool:
        return self.override is not None or self.factor != 1.0 or self.ceiling is not None

    def used(self, index: int, owner: float) -> float:
        """The LR group ``index`` updates with when its owner set ``owner``."""
        base = owner if self.override is None or index >= len(self.override) else self.override[index]
        lr = base * self.factor
        if self.ceiling is not None and index < len(self.ceiling):
            lr = min(lr, self.ceiling[index])
        return lr

    def reduce(self, factor: float) -> None:
        self.factor *= factor
        if self.ceiling is not None:
            self.ceiling = [c * factor for c in self.ceiling]

    def cap(self, lrs: list[float]) -> None:
        """Hold each group's LR at or below ``lrs`` (the lower of two caps)."""
        old = self.ceiling
        self.ceiling = list(lrs) if old is None else [min(a, b) for a, b in zip(old, lrs, strict=False)]

    def set(self, lr: float, owners: list[float]) -> None:
        """Group 0 at ``lr``, the others at their current ratio to group 0 (``lr`` too when
        group 0's LR is 0, as at the start of a warm-up). A person sets the LR: no cap."""
        first = owners[0] if owners else 0.0
        self.override = [lr * (o / first) if first > 0 else lr for o in owners] or [lr]
        self.factor = 1.0
        self.ceiling = None

    def describe(self) -> dict[str, Any]:
        return {"factor": self.factor, "override": self.override, "ceiling": self.ceiling}


def owner_lrs(optimizer: Any) -> list[float]:
    """Each param group's LR as its owner set it (a tensor LR read as a number)."""
    return [number(group["lr"]) for group in optimizer.param_groups]


def used_lrs(optimizer: Any, plan: LrPlan) -> list[float]:
    """The LR each group's next update uses."""
    return [plan.used(i, lr) for i, lr in enumerate(owner_lrs(optimizer))]


@contextlib.contextmanager
def applied(optimizer: Any, plan: LrPlan) -> Iterator[None]:
    """The plan's LRs in the param groups for the duration of one ``optimizer.step()``, and
    the owner's LRs back afterwards (unless the step itself assigned a new one)."""
    if not plan.active:
        yield
        return
    groups = optimizer.param_groups
    owned = [group["lr"] for group in groups]
    put = [_put(plan, i, lr) for i, lr in enumerate(owned)]
    for group, value in zip(groups, put, strict=True):
        group["lr"] = value
    try:
        yield
    finally:
        for group, value, original in zip(groups, put, owned, strict=False):
            if group.get("lr") is value:
                group["lr"] = original


def number(value: Any) -> float:
    """A float of an LR given as a number or a one-element tensor (reads the tensor: callers
    on the hot path use :func:`on_host` first)."""
    item = getattr(value, "item", None)
    return float(item()) if callable(item) else float(value)


def on_host(value: Any) -> bool:
    """Whether the LR can be read without waiting for a device: a number or a CPU tensor."""
    device = getattr(value, "device", None)
    return device is None or getattr(device, "type", "cpu") == "cpu"


def _put(plan: LrPlan, index: int, owned: Any) -> Any:
    """The LR to put in the group, in the form the owner used (a tensor stays a tensor on its
    device, computed there: no read-back)."""
    if isinstance(owned, (int, float)):
        return plan.used(index, float(owned))
    if plan.override is not None and index < len(plan.override):
        value = owned.new_full(owned.shape, plan.override[index] * plan.factor)
    else:
        value = owned * plan.factor
    if plan.ceiling is not None and index < len(plan.ceiling):
        value = value.clamp(max=plan.ceiling[index])
    return value
