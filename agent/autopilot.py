"""Autopilot: the agent's own corrective actions, decided at the step boundary from the
detector library, with zero steps of latency (no round trip to the server).

Policies, in the order they act:

1. **Reject the update** of a step whose loss or gradient norm is non-finite, or a severe
   spike (robust z of the loss or the gradient norm above ``spike_z``; the baseline never
   takes in flagged values). Capped: at most ``max_skips_in_row`` in a row and
   ``max_skip_fraction`` of the last ``skip_window`` steps. Past a cap the autopilot escalates
   (policy 2, and the server's alerts fire): a spiking step it may no longer skip trains as
   usual, but a non-finite one is still rejected, since its update would turn every weight
   into NaN.
2. **Reduce the LR** (``lr_factor``, never under ``min_lr``) after ``reduce_after``
   instabilities (skips or blocked skips) within ``instability_window`` steps, then waits
   ``refractory_steps`` before doing it again; at most ``max_lr_reductions`` (3) times per run.
   Past the skip cap, a spiking series is taken as a new level: the spike baselines restart.
3. **Roll back** on a persistent divergence of the loss (``Divergence``: median of the last
   20 over the 200 before, above ``divergence_ratio`` for 10 steps) when snapshots are kept
   (``run.watch(..., snapshot_every=K)``): to the newest snapshot before the rise began, then
   reduce the LR as in 2.

Every action is applied through the controller exactly like a command and reported like one
(``source: autopilot``), so the server records it and the UI shows it.

The autopilot reads the step's loss and gradient norm on the host: on a GPU that is one
synchronisation per step (as a GradScaler's own skip check). In a multi-process job only the
gradient norm decides (it is the same on every rank after the all-reduce; the loss is not),
so every rank takes the same decision.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from dataclasses import dataclass, fields
from typing import Any

from trimtab.builtin_commands import Rejected
from trimtab.control import Controller
from trimtab.detectors import Divergence, RobustSpike


@dataclass
class AutopilotOptions:
    skip_nonfinite: bool = True
    skip_spikes: bool = True
    spike_z: float = 25.0
    max_skips_in_row: int = 3
    max_skip_fraction: float = 0.01
    skip_window: int = 1000
    reduce_lr: bool = True
    lr_factor: float = 0.5
    min_lr: float = 0.0
    reduce_after: int = 3
    instability_window: int = 100
    refractory_steps: int = 200
    max_lr_reductions: int = 3  # automatic LR cuts per run, at most (then it only alerts)
    rollback: bool = True
    divergence_ratio: float = 1.5

    def check(self) -> None:
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"autopilot: lr_factor must be in (0, 1), got {self.lr_factor}")
        if not 0 < self.max_skip_fraction <= 1 or self.max_skips_in_row < 1 or self.skip_window < 1:
            raise ValueError("autopilot: need max_skips_in_row >= 1, skip_window >= 1, 0 < max_skip_fraction <= 1")
        if self.spike_z <= 0 or self.min_lr < 0 or self.reduce_after < 1 or self.divergence_ratio <= 1:
            raise ValueError("autopilot: need spike_z > 0, min_lr >= 0, reduce_after >= 1, divergence_ratio > 1")
        if self.max_lr_reductions < 0:
            raise ValueError("autopilot: max_lr_reductions must be >= 0")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class Autopilot:
    def __init__(self, control: Controller, options: AutopilotOptions, world_size: int = 1, run_uid: str = "") -> None:
        options.check()
        self.control, self.opts = control, options
        self.run_uid = run_uid or uuid.uuid4().hex
        self.use_loss = world_size <= 1
        self.loss_spike = RobustSpike(z=options.spike_z)
        self.grad_spike = RobustSpike(z=options.spike_z)
        self.divergence = Divergence(ratio=options.divergence_ratio)
        self.skips: deque[int] = deque()  # steps whose update the autopilot rejected
        self.in_row = 0
        self.instabilities: deque[int] = deque()
        self.last_reduce: int | None = None
        self.reductions = 0
        self.last_rollback: int | None = None

    def decide(self, step: int, loss: float | None, grad_norm: float | None, amp: bool) -> None:
        """Called at the boundary, after the controller applied the queued commands and before
        it decides whether this step's update is skipped."""
        trouble = self._trouble(step, loss, grad_norm, amp)
        if trouble is None:
            self.in_row = 0
        else:
            reason, nonfinite = trouble
            self._instability(step)
            allowed = self._may_skip(step)
            if allowed or nonfinite:  # a NaN update would poison the weights: never let it through
                self.control.drop_update()  # this step's update (the boundary settles it)
                self.skips.append(step)
                self.in_row += 1
                detail = {"reason": reason, "loss": loss, "grad_norm": grad_norm, "over_cap": not allowed}
                self._report(step, "skip_batches", {"n": 1}, detail)
            if not allowed:
                self._escalate(step, f"{reason}, and the skip cap is reached")
                if not nonfinite:
                    # A lasting level change is not a spike storm: past the cap the spike
                    # baselines start over (50 steps of warm-up), so the new level becomes normal.
                    self.loss_spike = RobustSpike(z=self.opts.spike_z)
                    self.grad_spike = RobustSpike(z=self.opts.spike_z)
        if loss is not None and self.use_loss and self.opts.rollback and self.divergence.update(step, loss) is not None:
            self._diverged(step)

    # ------------------------------------------------------------------ policies
    def _trouble(self, step: int, loss: float | None, grad_norm: float | None, amp: bool) -> tuple[str, bool] | None:
        """(reason, non-finite) when this step's update should be rejected."""
        loss = loss if self.use_loss else None
        finite_loss = loss is None or math.isfinite(loss)
        finite_grad = grad_norm is None or math.isfinite(grad_norm)
        if amp and finite_loss and not finite_grad:
            return None  # a GradScaler overflow: the scaler skips this step itself
        if not (finite_loss and finite_grad):
            return ("non-finite loss or gradient", True) if self.opts.skip_nonfinite else None
        spiked = []
        if loss is not None and self.loss_spike.update(step, loss) is not None:
            spiked.append("loss")
        if grad_norm is not None and self.grad_spike.update(step, grad_norm) is not None:
            spiked.append("gradient norm")
        if spiked and self.opts.skip_spikes:
            return f"{' and '.join(spiked)} spike (robust z > {self.opts.spike_z:g})", False
        return None

    def _may_skip(self, step: int) -> bool:
        while self.skips and self.skips[0] <= step - self.opts.skip_window:
            self.skips.popleft()
        budget = max(1, int(self.opts.max_skip_fraction * self.opts.skip_window))
        return self.in_row < self.opts.max_skips_in_row and len(self.skips) < budget

    def _instability(self, step: int) -> None:
        self.instabilities.append(step)
        while self.instabilities and self.instabilities[0] <= step - self.opts.instability_window:
            self.instabilities.popleft()
        if len(self.instabilities) >= self.opts.reduce_after:
            self._escalate(step, f"{len(self.instabilities)} instabilities within {self.opts.instability_window} steps")

    def _escalate(self, step: int, why: str) -> None:
        if not self.opts.reduce_lr or self.control.target.optimizer is None:
            return
        if self.last_reduce is not None and step - self.last_reduce < self.opts.refractory_steps:
            return
        self._reduce(step, why)

    def _reduce(self, step: int, why: str) -> None:
        if self.reductions >= self.opts.max_lr_reductions:
            return  # the alerts go on; cutting the LR further is a person's call
        self.reductions += 1
        args = {"factor": self.opts.lr_factor, "min_lr": self.opts.min_lr}
        try:
            detail = self.control.run_builtin("reduce_lr", args, step)
        except Rejected as exc:  # already at the floor: nothing more to do here
            detail = {"not_applied": str(exc)}
        self.last_reduce = step
        self.instabilities.clear()
        self._report(step, "reduce_lr", args, {**detail, "reason": why})

    def _diverged(self, step: int) -> None:
        snapshots = self.control.snapshots
        if snapshots is None or (
            self.last_rollback is not None and step - self.last_rollback < self.opts.refractory_steps
        ):
            return
        onset = step - self.divergence.short - self.divergence.patience  # the rise began before this
        before = [s for s in snapshots.steps() if s <= onset]
        if not before:
            return
        args = {"to_step": before[-1]}
        try:
            detail = self.control.run_builtin("rollback", args, step)
        except Rejected as exc:
            detail = {"not_applied": str(exc)}
        self.last_rollback = step
        self.divergence = Divergence(ratio=self.opts.divergence_ratio)  # the rolled-back history is gone
        self._report(step, "rollback", args, {**detail, "reason": "the loss diverged"})
        if self.opts.reduce_lr and self.control.target.optimizer is not None:
            self._reduce(step, "after a rollback for divergence")

    def _report(self, step: int, kind: str, args: dict[str, Any], detail: dict[str, Any]) -> None:
        # The same id on every rank (they take the same decisions): the server merges the
        # ranks' reports into one command with one entry per rank.
        ident = f"auto-{self.run_uid[:16]}-{step}-{kind}"
        self.control.record_automatic(ident, kind, args, step, detail)
