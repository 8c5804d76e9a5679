"""The alert outbox: one ``alert_deliveries`` row per (notification, sink), written in the
same transaction as the alert, so a notification exists exactly when its alert change does.

The delivery worker (``delivery.py``) sends the rows and records the outcome. Rows are
claimed with a lease: claiming pushes ``next_attempt_at`` past the request timeout and
counts the attempt, so a replica that dies mid-send leaves a row that becomes due again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, exists, func, insert, or_, select, update
from sqlalchemy.orm import aliased

from trimtab.jsonsafe import to_json
from trimtab.server.db.tables import alert_deliveries, alerts, sinks

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
EVENTS = ("firing", "escalated", "resolved")
ERROR_LIMIT = 1024  # alert_deliveries.last_error


def enqueue(conn: Connection, alert_id: int, event: str, payload: dict[str, Any]) -> int:
    """In the caller's transaction, queue ``payload`` for every enabled sink that takes the
    alert's project (a sink without a project takes all). Returns how many rows were queued."""
    if event not in EVENTS:
        raise ValueError(f"unknown alert event {event!r}; expected one of {EVENTS}")
    project_id = conn.execute(select(alerts.c.project_id).where(alerts.c.id == alert_id)).scalar_one()
    targets = conn.execute(
        select(sinks.c.id).where(
            sinks.c.enabled.is_(True), or_(sinks.c.project_id.is_(None), sinks.c.project_id == project_id)
        )
    ).all()
    if not targets:
        return 0
    now = time.time()
    snapshot = to_json(payload)  # PostgreSQL's json type refuses NaN
    conn.execute(
        insert(alert_deliveries),
        [
            {
                "alert_id": alert_id,
                "sink_id": row.id,
                "event": event,
                "payload": snapshot,
                "status": PENDING,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for row in targets
        ],
    )
    return len(targets)


@dataclass(frozen=True)
class Claimed:
    """A delivery this worker holds until ``lease_until`` (the fencing token is ``attempts``)."""

    id: int
    sink_id: int
    kind: str
    url: str
    secret: str | None
    event: str
    payload: dict[str, Any]
    attempts: int  # including this one
    created_at: float


def _sendable() -> Any:
    """Pending, of an enabled sink, and the oldest pending row of its (alert, sink): a sink
    never hears "resolved" before the "firing" it follows."""
    older = aliased(alert_deliveries)
    return and_(
        alert_deliveries.c.status == PENDING,
        sinks.c.enabled.is_(True),
        ~exists().where(
            older.c.alert_id == alert_deliveries.c.alert_id,
            older.c.sink_id == alert_deliveries.c.sink_id,
            older.c.status == PENDING,
            older.c.id < alert_deliveries.c.id,
        ),
    )


def claim(
    conn: Connection,
    now: float,
    lease_s: float,
    limit: int,
    per_sink: int,
    busy: dict[int, int],
    skip_locked: bool,
) -> list[Claimed]:
    """Claim up to ``limit`` due deliveries, leaving each sink at most ``per_sink`` in flight
    (``busy`` counts what this worker already has in flight per sink). On PostgreSQL the rows
    are locked with ``FOR UPDATE SKIP LOCKED`` so replicas claim disjoint sets; everywhere the
    claiming UPDATE is conditional on the row being unchanged, so two claimers never both win."""
    if limit <= 0:
        return []
    columns = (
        alert_deliveries.c.id,
        alert_deliveries.c.sink_id,
        alert_deliveries.c.attempts,
        alert_deliveries.c.next_attempt_at,
    )
    query = (
        select(*columns)
        .join(sinks, sinks.c.id == alert_deliveries.c.sink_id)
        .where(_sendable(), alert_deliveries.c.next_attempt_at <= now)
        .order_by(alert_deliveries.c.next_attempt_at, alert_deliveries.c.id)
        .limit(limit * 4)
    )
    full = full_sinks(busy, per_sink)
    if full:  # else a sink with a long backlog could fill every candidate slot
        query = query.where(alert_deliveries.c.sink_id.notin_(full))
    if skip_locked:
        query = query.with_for_update(skip_locked=True, of=alert_deliveries)
    taken = dict(busy)
    chosen: list[Any] = []
    for row in conn.execute(query):
        if len(chosen) >= limit:
            break
        if taken.get(row.sink_id, 0) >= per_sink:
            continue
        taken[row.sink_id] = taken.get(row.sink_id, 0) + 1
        chosen.append(row)
    won = []
    for row in chosen:
        result = conn.execute(
            update(alert_deliveries)
            .where(
                alert_deliveries.c.id == row.id,
                alert_deliveries.c.status == PENDING,
                alert_deliveries.c.attempts == row.attempts,
                alert_deliveries.c.next_attempt_at == row.next_attempt_at,
            )
            .values(attempts=row.attempts + 1, next_attempt_at=now + lease_s)
        )
        if result.rowcount == 1:
            won.append(row.id)
    if not won:
        return []
    rows = conn.execute(
        select(
            alert_deliveries.c.id,
            alert_deliveries.c.sink_id,
            sinks.c.kind,
            sinks.c.url,
            sinks.c.secret,
            alert_deliveries.c.event,
            alert_deliveries.c.payload,
            alert_deliveries.c.attempts,
            alert_deliveries.c.created_at,
        )
        .join(sinks, sinks.c.id == alert_deliveries.c.sink_id)
        .where(alert_deliveries.c.id.in_(won))
        .order_by(alert_deliveries.c.id)
    ).all()
    return [Claimed(**row._asdict()) for row in rows]


def mark_delivered(conn: Connection, item: Claimed, now: float) -> bool:
    """Record a 2xx. False when the row is no longer ours (its lease ran out and someone else took it)."""
    result = conn.execute(
        update(alert_deliveries)
        .where(*_ours(item))
        .values(status=DELIVERED, delivered_at=now, last_error=None, next_attempt_at=now)
    )
    return result.rowcount == 1


def mark_failed(
    conn: Connection,
    item: Claimed,
    error: str,
    now: float,
    retry_at: float | None,
) -> bool:
    """Record a failed attempt: due again at ``retry_at``, or ``dead`` when that is None."""
    values: dict[str, Any] = {"last_error": error[:ERROR_LIMIT]}
    if retry_at is None:
        values.update(status=DEAD, next_attempt_at=now)
    else:
        values.update(next_attempt_at=retry_at)
    return conn.execute(update(alert_deliveries).where(*_ours(item)).values(**values)).rowcount == 1


def release(conn: Connection, items: Iterable[Claimed], now: float) -> None:
    """Make claimed rows due now again (a worker stopping before it could send them)."""
    for item in items:
        conn.execute(update(alert_deliveries).where(*_ours(item)).values(next_attempt_at=now))


def _ours(item: Claimed) -> tuple[Any, ...]:
    return (
        alert_deliveries.c.id == item.id,
        alert_deliveries.c.status == PENDING,
        alert_deliveries.c.attempts == item.attempts,
    )


def full_sinks(busy: dict[int, int], per_sink: int) -> list[int]:
    """The sinks with ``per_sink`` deliveries in flight: nothing more is claimed for them."""
    return [sink for sink, n in busy.items() if n >= per_sink]


def next_due(conn: Connection, full: Iterable[int] = ()) -> float | None:
    """When the earliest row that ``claim`` would take becomes due: as ``claim`` chooses, but
    at any time, and leaving out the ``full`` sinks (a row waiting behind an older one of its
    (alert, sink), or for a sink at its in-flight share, is not due when its time comes)."""
    query = (
        select(func.min(alert_deliveries.c.next_attempt_at))
        .join(sinks, sinks.c.id == alert_deliveries.c.sink_id)
        .where(_sendable())
    )
    full = list(full)
    if full:
        query = query.where(alert_deliveries.c.sink_id.notin_(full))
    return conn.execute(query).scalar()


def backoff_s(attempts: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^(attempts-1))] (attempts counts the one that failed)."""
    ceiling = min(cap_s, base_s * 2.0 ** min(max(attempts - 1, 0), 62))
    return (rng or random).uniform(0.0, ceiling)
