"""Autopilot: the agent's own corrective actions, decided at the step boundary from the
detector library, with zero steps of latency (no round trip to the server).

Policies, in the order they act:

1. **Reject the update** of a step whose loss or gradient norm is non-finite, or a severe
   spike of the gradient norm (robust z above ``spike_z`` and at least ``spike_min_ratio``
   times its median; the baseline never takes in flagged values). A loss that jumps while the
   gradient norm stays within that is a *level shift* (new data, a curriculum stage, a
   schedule restart), not an instability: nothing is done about it. Only when the gradient
   norm is not measured (``run.step(loss)`` without ``run.watch``) does a loss spike (robust
   z above ``spike_z``) count on its own. Capped: at most ``max_skips_in_row`` in a row and
   ``max_skip_fraction`` of the last ``skip_window`` steps. Past a cap the autopilot escalates
   (policy 2, and the server's alerts fire): a spiking step it may no longer skip trains as
   usual, but a non-finite one is still rejected, since its update would turn every weight
   into NaN.
2. **Reduce the LR** (``lr_factor``, never under ``min_lr``) after ``reduce_after``
   instabilities (skips or blocked skips) within ``instability_window`` steps, then waits
   ``refractory_steps`` before doing it again; at most ``max_lr_reductions`` (10: x0.5 each
   is 1/1024) times per run. A cut is an LR command: it holds on top of whatever LR the
   script or scheduler sets, and through rollbacks (``lr.py``). Past the skip cap, a spiking
   series is taken as a new level: the spike baselines restart.
3. **Roll back** on a persistent divergence of the loss (``Divergence``: median of the last
   20 over the 200 before, above ``divergence_ratio`` for 10 steps) that the gradients back
   up (when measured: a gradient-norm spike as in 1, or its median over 50 steps doubled,
   within the last ``evidence_steps``; a loss that rose alone is a level shift), or after
   ``nonfinite_rollback_after`` non-finite steps in a row (rejecting them forever trains
   nothing), when snapshots are kept (``run.watch(..., snapshot_every=K)``): to the newest
   snapshot before the trouble began, then reduce the LR as in 2. Without snapshots, a
   non-finite streak cuts the LR instead.
4. **Watch the recovery.** For ``probation_steps`` after a rollback the loss must stay under
   ``divergence_ratio`` x its level before the trouble (median of the last 10) and finite:
   a relapse rolls back to the same snapshot again and cuts the LR again, without waiting.
5. **Give up and page** when it cannot recover: a relapse with no LR cut left (or no snapshot
   to go back to), or a non-finite streak with neither: it pauses the run (the server's
   control panel resumes or stops it; offline, where nobody could resume, it asks the loop
   to stop) and logs ``autopilot/gave_up``, which the shipped ``autopilot-gave-up`` rule pages
   as critical. It never rejects updates forever.

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
from collections.abc import Callable
from dataclasses import dataclass, fields
from statistics import median
from typing import Any

from trimtab.builtin_commands import Rejected
from trimtab.control import Controller
from trimtab.detectors import Divergence, RobustSpike


@dataclass
class AutopilotOptions:
    skip_nonfinite: bool = True
    skip_spikes: bool = True
    spike_z: float = 25.0
    spike_min_ratio: float = 5.0  # a gradient-norm spike is also this many times its median
    evidence_steps: int = 60  # a loss divergence is acted on when the gradients were in trouble this recently
    max_skips_in_row: int = 3
    max_skip_fraction: float = 0.01
    skip_window: int = 1000
    reduce_lr: bool = True
    lr_factor: float = 0.5
    min_lr: float = 0.0
    reduce_after: int = 3
    instability_window: int = 100
    refractory_steps: int = 200
    max_lr_reductions: int = 10  # automatic LR cuts per run, at most (then it gives up on a relapse)
    rollback: bool = True
    divergence_ratio: float = 1.5
    nonfinite_rollback_after: int = 5  # non-finite steps in a row that trigger a rollback (or LR cut)
    probation_steps: int = 100  # after a rollback, a relapse within this many steps is acted on at once

    def check(self) -> None:
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"autopilot: lr_factor must be in (0, 1), got {self.lr_factor}")
        if not 0 < self.max_skip_fraction <= 1 or self.max_skips_in_row < 1 or self.skip_window < 1:
            raise ValueError("autopilot: need max_skips_in_row >= 1, skip_window >= 1, 0 < max_skip_fraction <= 1")
        if self.spike_z <= 0 or self.min_lr < 0 or self.reduce_after < 1 or self.divergence_ratio <= 1:
            raise ValueError("autopilot: need spike_z > 0, min_lr >= 0, reduce_after >= 1, divergence_ratio > 1")
        if self.spike_min_ratio < 0 or self.evidence_steps < 1:
            raise ValueError("autopilot: need spike_min_ratio >= 0, evidence_steps >= 1")
        if self.max_lr_reductions < 0:
            raise ValueError("autopilot: max_lr_reductions must be >= 0")
        if self.nonfinite_rollback_after < 1 or self.probation_steps < 1:
            raise ValueError("autopilot: need nonfinite_rollback_after >= 1, probation_steps >= 1")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def check_names(cls, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(cls.names())}")


def autopilot_scalars(result: dict[str, Any]) -> dict[str, float]:
    """What an automatic action logs besides its command event: ``autopilot/actions`` (the
    shipped ``autopilot-acted`` rule) and, when it gave up, ``autopilot/gave_up`` (the
    shipped ``autopilot-gave-up`` rule pages)."""
    detail = result.get("detail") or {}
    if detail.get("source") != "autopilot":
        return {}
    return {"autopilot/actions": 1.0, **({"autopilot/gave_up": 1.0} if detail.get("gave_up") else {})}


@dataclass
class _Recovery:
    """After a rollback: the snapshot it went back to, the loss level before the trouble, and
    until when a relapse is acted on at once."""

    good_step: int
    reference: float | None
    until: int


class Autopilot:
    def __init__(
        self,
        control: Controller,
        options: AutopilotOptions,
        world_size: int = 1,
        run_uid: str = "",
        connected: Callable[[], bool] | None = None,
    ) -> None:
        options.check()
        self.control, self.opts = control, options
        self.run_uid = run_uid or uuid.uuid4().hex
        self.use_loss = world_size <= 1
        self.connected = connected or (lambda: False)
        self._new_baselines()
        self.divergence = Divergence(ratio=options.divergence_ratio)
        self.grad_trouble_at: int | None = None  # the last step the gradient norm spiked or doubled
        self.skips: deque[int] = deque()  # steps whose update the autopilot rejected
        self.in_row = 0
        self.nonfinite_from: int | None = None  # first step of the current non-finite streak
        self.instabilities: deque[int] = deque()
        self.last_reduce: int | None = None
        self.reductions = 0
        self.last_rollback: int | None = None
        self.recent: deque[float] = deque(maxlen=20)  # the last finite losses (the level to recover to)
        self.recovery: _Recovery | None = None
        self.gave_up = False

    def _new_baselines(self) -> None:
        self.loss_spike = RobustSpike(z=self.opts.spike_z)
        self.grad_spike = RobustSpike(z=self.opts.spike_z, min_ratio=self.opts.spike_min_ratio)
        self.grad_rise = Divergence(ratio=2.0, short=50)

    def decide_from(self, step: int, watcher: Any, loss: Any) -> None:
        """``decide`` on what the watcher measured this step (or the loss given to
        ``run.step`` when nothing is watched)."""
        loss_value: float | None = None
        grad_norm: float | None = None
        if watcher is not None and watcher.head is not None:
            values = watcher.head.tolist()  # one synchronisation on a GPU: the autopilot's price
            has_loss, has_grad = watcher.head_has
            loss_value = values[0] if has_loss else None
            grad_norm = values[1] if has_grad else None
        elif loss is not None:
            item = getattr(loss, "item", None)
            loss_value = float(item() if callable(item) else loss)
        self.decide(step, loss_value, grad_norm, amp=watcher is not None and watcher.scaler is not None)

    def decide(self, step: int, loss: float | None, grad_norm: float | None, amp: bool) -> None:
        """Called at the boundary, after the controller applied the queued commands and before
        it decides whether this step's update is skipped."""
        if self.gave_up:
            return  # paused or stopped: a person decides from here
        trouble = self._trouble(step, loss, grad_norm, amp)
        nonfinite = trouble is not None and trouble[1]
        if not nonfinite:
            self.nonfinite_from = None
        elif self.nonfinite_from is None:
            self.nonfinite_from = step
        if trouble is None:
            self.in_row = 0
        else:
            reason = trouble[0]
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
                    self._new_baselines()
        if self.nonfinite_from is not None and step - self.nonfinite_from + 1 >= self.opts.nonfinite_rollback_after:
            self._nonfinite_streak(step)
            return
        if loss is None or not self.use_loss or not math.isfinite(loss):
            return
        self.recent.append(loss)
        if self._relapsed(step) or not self.opts.rollback:
            return
        found = self.divergence.update(step, loss)
        if found is not None and self._gradients_agree(step, grad_norm):
            self._diverged(step, found.baseline)

    def _gradients_agree(self, step: int, grad_norm: float | None) -> bool:
        """Whether a loss divergence is an instability: with no gradient norm measured it is
        taken to be; else only when the gradients spiked or doubled recently."""
        if grad_norm is None:
            return True
        return self.grad_trouble_at is not None and step - self.grad_trouble_at <= self.opts.evidence_steps

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
        if grad_norm is None:  # only the loss to go by: a jump of it is all there is
            if loss is not None and self.loss_spike.update(step, loss) is not None and self.opts.skip_spikes:
                return f"loss spike (robust z > {self.opts.spike_z:g}; no gradient norm measured)", False
            return None
        if self.grad_rise.update(step, grad_norm) is not None:
            self.grad_trouble_at = step
        if self.grad_spike.update(step, grad_norm) is None:
            return None  # a loss that jumps alone is a level shift: nothing to reject
        self.grad_trouble_at = step
        if not self.opts.skip_spikes:
            return None
        return f"gradient norm spike (robust z > {self.opts.spike_z:g}, over {self.opts.spike_min_ratio:g}x)", False

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

    def _reduce(self, step: int, why: str) -> bool:
        """Cut the LR once more; whether it could (the per-run cap, ``min_lr``)."""
        if self.reductions >= self.opts.max_lr_reductions:
            return False  # the alerts go on; a relapse now gives up
        args = {"factor": self.opts.lr_factor, "min_lr": self.opts.min_lr}
        try:
            detail = self.control.run_builtin("reduce_lr", args, step)
        except Rejected as exc:  # already at the floor: nothing more to do here
            self.reductions = self.opts.max_lr_reductions
            self._report(step, "reduce_lr", args, {"not_applied": str(exc), "reason": why})
            return False
        self.reductions += 1
        self.last_reduce = step
        self.instabilities.clear()
        self._report(step, "reduce_lr", args, {**detail, "reason": why})
        return True

    def _diverged(self, step: int, level: float | None) -> None:
        if self.last_rollback is not None and step - self.last_rollback < self.opts.refractory_steps:
            return
        onset = step - self.divergence.short - self.divergence.patience  # the rise began before this
        self._roll_back(step, onset, level, "the loss diverged")

    def _nonfinite_streak(self, step: int) -> None:
        """Rejecting non-finite steps forever trains nothing: go back to before the streak
        (the weights may be what turns every step non-finite), with a lower LR; once that has
        been tried, or cannot be, give up."""
        start = self.nonfinite_from if self.nonfinite_from is not None else step
        self.nonfinite_from = None  # the next streak counts afresh
        why = f"{step - start + 1} non-finite steps in a row"
        if self.recovery is not None and step <= self.recovery.until:
            self._relapse(step, why)
            return
        level = median(self.recent) if self.recent else None
        if self._roll_back(step, start - 1, level, why):
            return
        if not (self.opts.reduce_lr and self.control.target.optimizer is not None and self._reduce(step, why)):
            self._give_up(step, f"{why}, and no snapshot to roll back to nor LR cut left")

    def _relapsed(self, step: int) -> bool:
        """During a recovery: act on a loss that rises again at once."""
        rec = self.recovery
        if rec is None:
            return False
        if step > rec.until:
            self.recovery = None
            return False
        window = list(self.recent)[-10:]  # cleared at the rollback: only losses since
        if rec.reference is None or len(window) < 5 or median(window) <= self.opts.divergence_ratio * rec.reference:
            return False
        why = f"the loss rose again after the rollback (median {median(window):.4g} vs {rec.reference:.4g})"
        self._relapse(step, why)
        return True

    def _relapse(self, step: int, why: str) -> None:
        rec = self.recovery
        assert rec is not None
        snapshots = self.control.snapshots
        kept = snapshots.steps() if snapshots is not None else []
        target = rec.good_step if rec.good_step in kept else (min(kept) if kept else None)
        # Rolling back again without a lower LR would replay the same failure.
        can_cut = self.opts.reduce_lr and self.reductions < self.opts.max_lr_reductions
        if target is None or not can_cut:
            self._give_up(step, f"{why}; no {'snapshot' if target is None else 'LR cut'} left to try")
            return
        self._roll_back(step, target, rec.reference, why, relapse=True)

    def _roll_back(self, step: int, before: int, level: float | None, why: str, relapse: bool = False) -> bool:
        """Roll back to the newest snapshot at or before ``before`` and cut the LR; whether it
        rolled back."""
        snapshots = self.control.snapshots
        if snapshots is None or not self.opts.rollback:
            return False
        candidates = [s for s in snapshots.steps() if s <= before]
        if not candidates:
            return False
        args = {"to_step": candidates[-1]}
        try:
            detail = self.control.run_builtin("rollback", args, step)
        except Rejected as exc:
            self._report(step, "rollback", args, {"not_applied": str(exc), "reason": why})
            return False
        self.last_rollback = step
        self.divergence = Divergence(ratio=self.opts.divergence_ratio)  # the rolled-back history is gone
        self._new_baselines()
        self.in_row = 0
        self.recent.clear()
        self.recovery = _Recovery(candidates[-1], level, step + self.opts.probation_steps)
        lrs = detail.get("lr_after")  # the LR the run used at the snapshot: it trained well there
        if self.opts.reduce_lr and lrs:
            self.control.lr.cap([float(lr) for lr in lrs])  # a schedule or script re-creating the fault cannot
        self._report(step, "rollback", args, {**detail, "reason": why, "relapse": relapse})
        if self.opts.reduce_lr and self.control.target.optimizer is not None:
            self._reduce(step, f"after a rollback ({why})")
        return True

    def _give_up(self, step: int, why: str) -> None:
        """Pause and page: nothing the autopilot may do helps. Offline nobody could resume a
        pause, so it asks the loop to stop instead (``run.should_stop()``)."""
        self.gave_up = True
        kind = "pause" if self.connected() else "stop"
        try:
            detail = self.control.run_builtin(kind, {}, step)
        except Rejected as exc:
            detail = {"not_applied": str(exc)}
        self._report(step, kind, {}, {**detail, "reason": f"gave up: {why}", "gave_up": True})

    def _report(self, step: int, kind: str, args: dict[str, Any], detail: dict[str, Any]) -> None:
        # The same id on every rank (they take the same decisions): the server merges the
        # ranks' reports into one command with one entry per rank.
        ident = f"auto-{self.run_uid[:16]}-{step}-{kind}"
        self.control.record_automatic(ident, kind, args, step, detail)
