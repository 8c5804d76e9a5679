"""Alert rows from the slots' ops: open, fold, escalate, resolve, each with its outbox
notification in the same transaction. An ``info`` alert (an annotation: a level shift the
gradients did not confirm, or a rule of severity info) is never notified; when a later
finding of its slot pages, it escalates and is announced as firing. The database is the truth across replicas: a fold or
escalation applies only to an alert still firing; when another replica resolved it, or
opened one meanwhile, the slot takes the alert the database has."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from trimtab.detectors import INFO, SEVERITY_RANK, Finding
from trimtab.detectors.remedies import REMEDY_PERSISTENT_JUMP, REMEDY_SHIFT, REMEDY_SPIKE
from trimtab.server.alerts import outbox
from trimtab.server.alerts import store as db
from trimtab.server.alerts.slots import EngineStats, Op, RunState
from trimtab.server.db.store import Store


class AlertWriter:
    def __init__(self, store: Store, base_url: str, stats: EngineStats) -> None:
        self.store, self.base_url, self.stats = store, base_url, stats

    def write(self, rs: RunState, ops: list[Op], provenance: Sequence[tuple[int, int, Any]] = ()) -> int:
        """Apply the ops in one transaction (and attach NaN provenance to the alerts of its
        steps); returns how many notifications were queued."""
        if not ops and not provenance:
            return 0
        notified = 0
        with self.store.transaction() as conn:
            now = time.time()
            for op in ops:
                notified += self._apply(conn, rs, op, now, provenance)
            for rank, step, data in provenance:
                db.add_provenance(conn, rs.run_id, rank, step, _provenance_body(data))
        for op in ops:
            if op.slot is not None:
                op.slot.last_op = None
        return notified

    def _apply(
        self, conn: Connection, rs: RunState, op: Op, now: float, provenance: Sequence[tuple[int, int, Any]] = ()
    ) -> int:
        alert, found = op.alert, op.finding
        if op.kind == "resolve":
            if db.resolve(conn, alert.id, op.reason, now) and alert.notified:
                return self.notify(conn, alert.id, "resolved")
            return 0
        assert found is not None and op.slot is not None
        slot = op.slot
        if op.kind != "open":
            escalate = op.kind == "escalate"
            was_notified = alert.notified
            announce = escalate and not op.silent  # news even for an alert that opened silently
            # A silent alert (opened in cooldown, or by replayed history) that live findings
            # keep firing is announced once no cooldown holds it back any more.
            late = (
                not alert.notified
                and not escalate
                and not op.silent
                and found.severity != INFO  # info findings never page, even into a paging alert
                and not db.in_cooldown(conn, rs.run_id, slot.spec.name, slot.key, slot.spec.cooldown_s, now)
            )
            notified = alert.notified or announce or late
            severity = found.severity if escalate else None
            paging = alert.severity != INFO  # the slot's severity after this op; info keeps "nothing is wrong"
            persistent = REMEDY_PERSISTENT_JUMP if slot.spec.remedy == REMEDY_SPIKE and paging else None
            remedy = slot.spec.remedy if escalate else None  # an info alert's shift hint gives way
            if db.fold(conn, alert, found, op.count, notified, now, severity, persistent, remedy):
                alert.notified = notified
                if escalate:
                    alert.severity = found.severity
                if announce or late:
                    return self.notify(conn, alert.id, "escalated" if announce and was_notified else "firing")
                return 0
        # Opening, or the alert is no longer firing: go by the slot's alert in the database
        # (another replica may have resolved this one, or opened one meanwhile).
        current = db.firing_alert(conn, rs.run_id, slot.rank, slot.spec.name, slot.key)
        if current is not None and current.id != alert.id:
            return self._fold_into(conn, op, current, now)
        alert.notified = (
            found.severity != INFO
            and not op.silent
            and not db.in_cooldown(conn, rs.run_id, slot.spec.name, slot.key, slot.spec.cooldown_s, now)
        )
        alert.severity = found.severity
        alert.id = db.open_alert(
            conn,
            run_id=rs.run_id,
            project_id=rs.project_id,
            rank=slot.rank,
            rule=slot.spec.name,
            key=slot.key,
            remedy=_remedy(slot.spec.remedy, found),
            finding=found,
            notified=alert.notified,
            now=now,
        )
        self.stats.opened += 1
        if not alert.notified:
            return 0
        for rank, step, data in provenance:  # before the payload is taken, so the first page has it
            if rank == slot.rank:
                db.add_provenance(conn, rs.run_id, rank, step, _provenance_body(data))
        return self.notify(conn, alert.id, "firing")

    def _fold_into(self, conn: Connection, op: Op, current: db.OpenAlert, now: float) -> int:
        """Fold the op's finding into the slot's firing alert that another replica opened, and
        make it the slot's alert in memory (the op's alert object is the slot's)."""
        alert, found = op.alert, op.finding
        assert found is not None
        alert.id, alert.notified, alert.severity = current.id, current.notified, current.severity
        if found.step <= current.last_step:  # that replica had this finding already
            alert.last_step = max(alert.last_step, current.last_step)
            return 0
        escalate = SEVERITY_RANK.get(found.severity, 1) > SEVERITY_RANK.get(current.severity, 1)
        announce = escalate and not op.silent
        alert.last_step = max(alert.last_step, current.last_step)
        spec_remedy = op.slot.spec.remedy if op.slot is not None else None
        severity = found.severity if escalate else None
        paging = (severity or current.severity) != INFO
        persistent = REMEDY_PERSISTENT_JUMP if spec_remedy == REMEDY_SPIKE and paging else None
        remedy = spec_remedy if escalate else None
        if not db.fold(conn, alert, found, op.count, current.notified or announce, now, severity, persistent, remedy):
            return 0  # resolved again meanwhile: the next finding opens a new one
        alert.notified = current.notified or announce
        if escalate:
            alert.severity = found.severity
        return self.notify(conn, alert.id, "escalated" if current.notified else "firing") if announce else 0

    def notify(self, conn: Connection, alert_id: int, event: str) -> int:
        """Queue the alert's notification (its payload as of now) in the outbox."""
        queued = outbox.enqueue(conn, alert_id, event, db.payload_of(conn, alert_id, self.base_url))
        self.stats.notifications += queued
        return queued


def _remedy(rule_remedy: str, found: Finding) -> str:
    """An unconfirmed finding (a level shift, info) says nothing is wrong; else the rule's hint."""
    return REMEDY_SHIFT if found.data.get("unconfirmed") else rule_remedy


def _provenance_body(data: Any) -> dict[str, Any]:
    return data if isinstance(data, dict) else {"data": data}
