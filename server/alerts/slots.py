"""The alert lifecycle in memory: slots (one rule on one matched key of one run and rank),
what each point fed to a slot does to its alert, as ops the engine then writes in order.

No I/O here: the engine (``alerts.py``) loads slots, feeds them and writes the ops.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from trimtab.detectors import SEVERITY_RANK, Finding, RuleEvaluator, RuleSpec
from trimtab.server.alerts.store import QUIET, RULE_REMOVED, OpenAlert

NO_STEP = -(2**63)  # detector_states.step of a slot that has seen nothing of its key


@dataclass
class EngineStats:
    points: int = 0  # fed to evaluators
    findings: int = 0
    opened: int = 0
    notifications: int = 0  # outbox rows written
    catch_ups: int = 0  # batches replayed from the database instead of queued
    failures: int = 0  # items whose processing failed (their run is reloaded and replayed)


@dataclass
class Slot:
    """One rule on one matched key of one (run, rank)."""

    rank: int
    spec: RuleSpec
    key: str
    evaluator: RuleEvaluator
    seen: dict[str, int | None]  # watched key -> last step fed (None: nothing yet)
    open: OpenAlert | None
    handled: int | None  # last step of this slot's newest alert
    dirty: bool = False
    last_op: Op | None = None  # the newest op of the batch being processed, to coalesce folds

    @property
    def ident(self) -> tuple[int, str, str]:
        return (self.rank, self.spec.name, self.key)

    def state_row(self, run_id: int) -> dict[str, Any]:
        step = self.seen.get(self.key)
        return {
            "run_id": run_id,
            "rank": self.rank,
            "rule_name": self.spec.name,
            "key": self.key,
            "state": {"evaluator": self.evaluator.state(), "seen": dict(self.seen)},
            "step": NO_STEP if step is None else step,
        }


@dataclass
class Op:
    kind: str  # open | fold | escalate | resolve
    slot: Slot | None
    alert: OpenAlert
    finding: Finding | None = None
    count: int = 1  # findings a fold stands for
    reason: str = ""
    # From the replay of a fresh slot's history: an open is not notified, nor an escalation
    # (a resolution follows the alert's ``notified``); only a live fold may announce a silent alert.
    silent: bool = False


@dataclass
class RunState:
    run_id: int
    project_id: int
    rules: list[RuleSpec] = field(default_factory=list)  # enabled effective rules
    rules_at: float = float("-inf")  # monotonic time they were read
    slots: dict[tuple[int, str, str], Slot] = field(default_factory=dict)
    routes: dict[tuple[int, str], list[Slot]] = field(default_factory=dict)  # (rank, key) -> slots fed by it
    matches: dict[str, list[RuleSpec]] = field(default_factory=dict)  # key -> enabled rules matching it
    last_active: float = 0.0

    def specs_for(self, key: str) -> list[RuleSpec]:
        found = self.matches.get(key)
        if found is None:
            found = self.matches[key] = [spec for spec in self.rules if spec.matches(key)]
        return found

    def add(self, slot: Slot) -> None:
        self.slots[slot.ident] = slot
        for key in slot.evaluator.keys:
            self.routes.setdefault((slot.rank, key), []).append(slot)

    def remove(self, slot: Slot) -> None:
        del self.slots[slot.ident]
        for key in slot.evaluator.keys:
            routed = self.routes.get((slot.rank, key), [])
            if slot in routed:
                routed.remove(slot)

    def reconcile(self) -> list[Op]:
        """Bring the slots in line with ``rules`` (just read again); returns resolve ops for
        alerts whose rule is gone, disabled, or no longer matches their key."""
        ops: list[Op] = []
        self.matches.clear()
        by_name = {spec.name: spec for spec in self.rules}
        for slot in list(self.slots.values()):
            spec = by_name.get(slot.spec.name)
            if spec == slot.spec:
                continue
            if spec is None or not spec.matches(slot.key):
                self.remove(slot)
                if slot.open is not None:
                    ops.append(Op("resolve", slot, slot.open, reason=RULE_REMOVED))
                    slot.open = None
                continue
            self.remove(slot)
            if spec.fingerprint() == slot.spec.fingerprint():  # severity, remedy, cooldown...: same state
                slot.evaluator = RuleEvaluator.restore(spec, slot.key, slot.evaluator.state())
                slot.spec = spec
                slot.dirty = True
                self.add(slot)
            # else other detector settings: the slot is rebuilt from the key's history when next used
        return ops


def in_step_order(
    slot: Slot, series: Iterable[tuple[str, Iterable[tuple[int, float]]]]
) -> Iterator[tuple[int, str, float]]:
    """(step, key, value) of the points of several of the slot's keys (each given in step
    order), merged in step order; within one step, in the order of the evaluator's keys. So a
    rule watching two keys sees the same sequence however the points were batched."""
    order = {key: i for i, key in enumerate(slot.evaluator.keys)}
    tagged = [_tagged(order.get(key, len(order)), key, points) for key, points in series]
    for step, _, key, value in heapq.merge(*tagged):
        yield step, key, value


def _tagged(rank: int, key: str, points: Iterable[tuple[int, float]]) -> Iterator[tuple[int, int, str, float]]:
    for step, value in points:
        yield step, rank, key, value


def feed_point(
    slot: Slot, key: str, step: int, value: float, ops: list[Op], stats: EngineStats, silent: bool = False
) -> None:
    """Feed one point to a slot; what it does to the slot's alert is appended to ``ops``.
    A point with a finding folds into the firing alert; only a point of the slot's key without
    one can resolve it (so a sparse key that keeps firing keeps one alert open)."""
    seen = slot.seen[key]
    if seen is not None and step <= seen:
        return
    slot.seen[key] = step
    slot.dirty = True
    stats.points += 1
    found = slot.evaluator.update(key, step, value)
    if found is None:
        if key == slot.key:
            _quiet(slot, ops)
        return
    if slot.handled is not None and found.step <= slot.handled:
        return
    stats.findings += 1
    slot.handled = found.step
    alert = slot.open
    if alert is None:
        slot.open = OpenAlert(0, found.severity, found.step, False)
        _op(slot, Op("open", slot, slot.open, found, silent=silent), ops)
    elif SEVERITY_RANK.get(found.severity, 1) > SEVERITY_RANK.get(alert.severity, 1):
        alert.severity = found.severity
        alert.last_step = max(alert.last_step, found.step)
        _op(slot, Op("escalate", slot, alert, found, silent=silent), ops)
    else:
        alert.last_step = max(alert.last_step, found.step)
        last = slot.last_op
        if last is not None and last.kind == "fold" and last.alert is alert:
            last.count += 1
            last.finding = found
            last.silent = last.silent and silent  # a live finding among them makes the fold live
        else:
            _op(slot, Op("fold", slot, alert, found, silent=silent), ops)
    if key != slot.key:
        # A finding confirmed late (by the other key) may already be followed by enough quiet steps
        _quiet(slot, ops)


def _quiet(slot: Slot, ops: list[Op]) -> None:
    """Resolve the slot's alert once its key has gone ``resolve_after_steps`` steps past it."""
    alert, seen = slot.open, slot.seen[slot.key]
    if alert is not None and seen is not None and seen - alert.last_step >= slot.spec.resolve_after_steps:
        _op(slot, Op("resolve", slot, alert, reason=QUIET), ops)
        slot.open = None


def _op(slot: Slot, op: Op, ops: list[Op]) -> None:
    ops.append(op)
    slot.last_op = op
