"""The alerts' SQL: open, fold, escalate and resolve alerts, the cooldown check, the payload
an alert is shown and sent as, the API's listings, and persisted detector state.

Blocking, called on the alert engine's thread (writes) or a worker thread (reads). Values
follow the point tables' rule: ``alerts.value`` is NULL exactly when it is NaN.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, and_, case, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from trimtab.detectors import Finding
from trimtab.detectors.remedies import PERSISTENT_COUNT
from trimtab.errors import ErrorCode, TrimtabError
from trimtab.jsonsafe import float_to_json, from_json, to_json
from trimtab.server.db.tables import alerts, detector_states, metric_keys, projects, runs, scalar_points

FIRING, RESOLVED = "firing", "resolved"
TEXT_LIMIT = 1024  # alerts.message and alerts.remedy
QUIET, RUN_FINISHED, RULE_REMOVED, RUN_STALE = "quiet", "run_finished", "rule_removed", "run_stale"


@dataclass
class OpenAlert:
    """What the engine remembers of a firing alert."""

    id: int
    severity: str
    last_step: int
    notified: bool


@dataclass(frozen=True)
class SlotHistory:
    """A (run, rank, rule, key)'s firing alert, if any, and the last step any of its alerts
    covers: a finding at or before that step was already handled (a replay after a restart)."""

    open: OpenAlert | None
    handled_step: int | None


def _db_float(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def _slot_where(run_id: int, rank: int, rule: str, key: str) -> tuple[Any, ...]:
    return (alerts.c.run_id == run_id, alerts.c.rank == rank, alerts.c.rule_name == rule, alerts.c.key == key)


def slot_history(conn: Connection, run_id: int, rank: int, rule: str, key: str) -> SlotHistory:
    handled = conn.execute(select(func.max(alerts.c.last_step)).where(*_slot_where(run_id, rank, rule, key))).scalar()
    return SlotHistory(firing_alert(conn, run_id, rank, rule, key), None if handled is None else int(handled))


def firing_alert(conn: Connection, run_id: int, rank: int, rule: str, key: str) -> OpenAlert | None:
    """The (run, rank, rule, key)'s firing alert as the database has it now (another replica
    may have opened or resolved one since this process last looked)."""
    row = conn.execute(
        select(alerts.c.id, alerts.c.severity, alerts.c.last_step, alerts.c.notified)
        .where(*_slot_where(run_id, rank, rule, key), alerts.c.status == FIRING)
        .order_by(alerts.c.id.desc())
        .limit(1)
    ).first()
    return None if row is None else OpenAlert(row.id, row.severity, int(row.last_step), bool(row.notified))


def in_cooldown(conn: Connection, run_id: int, rule: str, key: str, cooldown_s: float, now: float) -> bool:
    """Whether a notified alert of this run, rule and key (any rank) is firing, or resolved
    less than ``cooldown_s`` ago: then a new one opens silently."""
    return (
        conn.execute(
            select(alerts.c.id)
            .where(
                alerts.c.run_id == run_id,
                alerts.c.rule_name == rule,
                alerts.c.key == key,
                alerts.c.notified.is_(True),
                or_(alerts.c.status == FIRING, alerts.c.resolved_at >= now - cooldown_s),
            )
            .limit(1)
        ).first()
        is not None
    )


def open_alert(
    conn: Connection,
    *,
    run_id: int,
    project_id: int,
    rank: int,
    rule: str,
    key: str,
    remedy: str,
    finding: Finding,
    notified: bool,
    now: float,
) -> int:
    return int(
        conn.execute(
            insert(alerts)
            .values(
                run_id=run_id,
                project_id=project_id,
                rank=rank,
                rule_name=rule,
                key=key,
                detector=finding.detector,
                severity=finding.severity,
                status=FIRING,
                message=finding.message[:TEXT_LIMIT],
                remedy=remedy[:TEXT_LIMIT],
                value=_db_float(finding.value),
                baseline=_db_float(finding.baseline),
                first_step=finding.step,
                last_step=finding.step,
                fired_at=now,
                updated_at=now,
                count=1,
                notified=notified,
                data=_finding_data(finding),
            )
            .returning(alerts.c.id)
        ).scalar_one()
    )


def fold(
    conn: Connection,
    alert: OpenAlert,
    finding: Finding,
    count: int,
    notified: bool,
    now: float,
    severity: str | None = None,
    persistent_remedy: str | None = None,
    remedy: str | None = None,
) -> bool:
    """Fold ``count`` later findings into the firing alert, ``finding`` the newest of them (and
    set ``severity`` when given: an escalation; ``remedy`` when given: an info alert escalated
    takes its rule's hint; and ``persistent_remedy`` as the remedy once the alert holds
    ``PERSISTENT_COUNT`` findings: the value stayed up). False when it is not firing any more
    (another replica resolved it)."""
    values: dict[str, Any] = {
        "count": alerts.c.count + count,
        "last_step": alert.last_step,
        "value": _db_float(finding.value),
        "baseline": _db_float(finding.baseline),
        "message": finding.message[:TEXT_LIMIT],
        "notified": notified,
        "updated_at": now,
    }
    if severity is not None:
        values["severity"] = severity
    current = alerts.c.remedy if remedy is None else remedy[:TEXT_LIMIT]
    if persistent_remedy is not None:
        values["remedy"] = case((alerts.c.count + count >= PERSISTENT_COUNT, persistent_remedy), else_=current)
    elif remedy is not None:
        values["remedy"] = current
    result = conn.execute(update(alerts).where(alerts.c.id == alert.id, alerts.c.status == FIRING).values(**values))
    return result.rowcount == 1


def resolve(conn: Connection, alert_id: int, reason: str, now: float) -> bool:
    """Resolve a firing alert; False when it was not firing any more."""
    return (
        conn.execute(
            update(alerts)
            .where(alerts.c.id == alert_id, alerts.c.status == FIRING)
            .values(status=RESOLVED, resolved_at=now, updated_at=now, resolve_reason=reason)
        ).rowcount
        == 1
    )


def firing_of_run(conn: Connection, run_id: int) -> list[tuple[int, bool]]:
    """(id, notified) of every firing alert of the run, on every rank."""
    rows = conn.execute(
        select(alerts.c.id, alerts.c.notified).where(alerts.c.run_id == run_id, alerts.c.status == FIRING)
    ).all()
    return [(r.id, bool(r.notified)) for r in rows]


def firing_of_ended_runs(
    conn: Connection, now: float, finished_grace_s: float, stale_after_s: float
) -> list[tuple[int, int, bool, str]]:
    """(id, run id, notified, reason) of the firing alerts of runs that finished more than
    ``finished_grace_s`` ago (``run_finished``) or were last seen more than ``stale_after_s``
    ago (``run_stale``: no data and no heartbeat)."""
    finished = and_(runs.c.status == "finished", runs.c.finished_at <= now - finished_grace_s)
    rows = conn.execute(
        select(alerts.c.id, alerts.c.run_id, alerts.c.notified, finished.label("finished"))
        .join(runs, runs.c.id == alerts.c.run_id)
        .where(alerts.c.status == FIRING, or_(finished, runs.c.last_seen_at < now - stale_after_s))
        .order_by(alerts.c.id)
    ).all()
    return [(r.id, r.run_id, bool(r.notified), RUN_FINISHED if r.finished else RUN_STALE) for r in rows]


def firing_of_project(conn: Connection, project_id: int) -> list[tuple[int, int, str, bool]]:
    """(id, run id, rule name, notified) of the project's firing alerts."""
    rows = conn.execute(
        select(alerts.c.id, alerts.c.run_id, alerts.c.rule_name, alerts.c.notified).where(
            alerts.c.project_id == project_id, alerts.c.status == FIRING
        )
    ).all()
    return [(r.id, r.run_id, r.rule_name, bool(r.notified)) for r in rows]


def add_provenance(conn: Connection, run_id: int, rank: int, step: int, data: Mapping[str, Any]) -> list[int]:
    """Attach a ``nonfinite`` event's data (where the NaN was born) to the run's firing
    non-finite alerts of that rank whose steps include ``step`` and that have none yet."""
    rows = conn.execute(
        select(alerts.c.id, alerts.c.data).where(
            alerts.c.run_id == run_id,
            alerts.c.rank == rank,
            alerts.c.status == FIRING,
            alerts.c.detector == "nonfinite",
            alerts.c.first_step <= step,
            alerts.c.last_step >= step,
        )
    ).all()
    changed = []
    for row in rows:
        if "provenance" in (row.data or {}):
            continue
        body = {**(row.data or {}), "provenance": to_json(dict(data))}
        conn.execute(update(alerts).where(alerts.c.id == row.id).values(data=body))
        changed.append(row.id)
    return changed


def _finding_data(finding: Finding) -> dict[str, Any]:
    data: dict[str, Any] = to_json(dict(finding.data))
    if finding.score is not None:
        data.setdefault("score", float_to_json(finding.score))
    return data


# ---------------------------------------------------------------- reading


ALERT_COLUMNS = (
    alerts,
    projects.c.name.label("project"),
    runs.c.name.label("run_name"),
    runs.c.uid.label("run_uid"),
)


def _joined() -> Any:
    return select(*ALERT_COLUMNS).select_from(
        alerts.join(runs, runs.c.id == alerts.c.run_id).join(projects, projects.c.id == alerts.c.project_id)
    )


def alert_payload(row: Any, base_url: str) -> dict[str, Any]:
    """An alert as the API shows it and sinks receive it (JSON-safe: NaN and Inf as strings)."""
    value = math.nan if row.value is None else row.value
    return {
        "id": row.id,
        "project": row.project,
        "run_id": row.run_id,
        "run_name": row.run_name,
        "run_uid": row.run_uid,
        "rank": row.rank,
        "rule": row.rule_name,
        "key": row.key,
        "detector": row.detector,
        "severity": row.severity,
        "status": row.status,
        "message": row.message,
        "remedy": row.remedy,
        "value": float_to_json(value),
        "baseline": None if row.baseline is None else float_to_json(row.baseline),
        "first_step": row.first_step,
        "last_step": row.last_step,
        "count": row.count,
        "fired_at": _iso(row.fired_at),
        "updated_at": _iso(row.updated_at),
        "resolved_at": _iso(row.resolved_at),
        "resolve_reason": row.resolve_reason,
        "notified": bool(row.notified),
        "data": row.data or {},
        "url": f"{base_url.rstrip('/')}/runs/{row.run_id}",
    }


def payload_of(conn: Connection, alert_id: int, base_url: str) -> dict[str, Any]:
    return alert_payload(conn.execute(_joined().where(alerts.c.id == alert_id)).one(), base_url)


@dataclass(frozen=True)
class AlertFilter:
    status: str | None = None
    severity: str | None = None
    project: str | None = None
    run_id: int | None = None
    rank: int | None = None
    rule: str | None = None
    after_id: int | None = None
    before_id: int | None = None
    oldest_first: bool = False
    limit: int = 100


def list_alerts(conn: Connection, f: AlertFilter, base_url: str) -> list[dict[str, Any]]:
    cond: list[Any] = []
    for column, value in (
        (alerts.c.status, f.status),
        (alerts.c.severity, f.severity),
        (projects.c.name, f.project),
        (alerts.c.run_id, f.run_id),
        (alerts.c.rank, f.rank),
        (alerts.c.rule_name, f.rule),
    ):
        if value is not None:
            cond.append(column == value)
    if f.after_id is not None:
        cond.append(alerts.c.id > f.after_id)
    if f.before_id is not None:
        cond.append(alerts.c.id < f.before_id)
    order = alerts.c.id if f.oldest_first else alerts.c.id.desc()
    query = _joined().where(and_(*cond)).order_by(order).limit(f.limit)
    return [alert_payload(row, base_url) for row in conn.execute(query)]


def get_alert(conn: Connection, alert_id: int, base_url: str) -> dict[str, Any]:
    row = conn.execute(_joined().where(alerts.c.id == alert_id)).first()
    if row is None:
        raise TrimtabError(ErrorCode.ALERT_NOT_FOUND, f"no alert with id {alert_id}")
    return alert_payload(row, base_url)


# ---------------------------------------------------------------- detector state


def load_state(conn: Connection, run_id: int, rank: int, rule: str, key: str) -> dict[str, Any] | None:
    state = conn.execute(
        select(detector_states.c.state).where(
            detector_states.c.run_id == run_id,
            detector_states.c.rank == rank,
            detector_states.c.rule_name == rule,
            detector_states.c.key == key,
        )
    ).scalar()
    return from_json(dict(state)) if isinstance(state, Mapping) else None


def save_states(conn: Connection, rows: Iterable[dict[str, Any]], sqlite: bool) -> None:
    """Upsert ``{run_id, rank, rule_name, key, state, step}`` rows. A saved row whose step is
    newer is kept (another replica went further with that slot). Non-finite floats anywhere in
    a state are stored as strings (PostgreSQL's json refuses NaN) and read back as floats."""
    now = time.time()
    values = [{**r, "state": to_json(r["state"]), "updated_at": now} for r in rows]
    if not values:
        return
    stmt = (sqlite_insert if sqlite else pg_insert)(detector_states)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["run_id", "rank", "rule_name", "key"],
            set_={"state": stmt.excluded.state, "step": stmt.excluded.step, "updated_at": stmt.excluded.updated_at},
            where=stmt.excluded.step >= detector_states.c.step,
        ),
        values,
    )


def points_after(
    conn: Connection, run_id: int, rank: int, key: str, after: int | None, page: int, newest: int | None = None
) -> Iterator[tuple[int, float]]:
    """(step, value) of a rank's scalar key after step ``after`` (from the first when None), in
    step order, read forward in pages of ``page`` rows so that nothing in between is skipped.
    With ``newest``, only the newest that many of them (a rule new to a long run starts from
    its recent history)."""
    key_id = conn.execute(
        select(metric_keys.c.id).where(
            metric_keys.c.run_id == run_id,
            metric_keys.c.rank == rank,
            metric_keys.c.kind == "scalar",
            metric_keys.c.name == key,
        )
    ).scalar()
    if key_id is None:
        return
    of_key = scalar_points.c.key_id == key_id
    if newest is not None:
        query = select(scalar_points.c.step).where(of_key)
        if after is not None:
            query = query.where(scalar_points.c.step > after)
        first = conn.execute(query.order_by(scalar_points.c.step.desc()).offset(max(newest - 1, 0)).limit(1)).scalar()
        if first is not None:
            after = int(first) - 1
    while True:
        query = select(scalar_points.c.step, scalar_points.c.value).where(of_key)
        if after is not None:
            query = query.where(scalar_points.c.step > after)
        rows = conn.execute(query.order_by(scalar_points.c.step, scalar_points.c.wall_time).limit(page)).all()
        for s, v in rows:
            yield int(s), math.nan if v is None else float(v)
        if len(rows) < page:
            return
        # The rest of a step split across pages is skipped: a step is fed once (its first row).
        after = int(rows[-1][0])


def scalar_keys(conn: Connection, run_id: int, rank: int) -> list[str]:
    return list(
        conn.execute(
            select(metric_keys.c.name).where(
                metric_keys.c.run_id == run_id, metric_keys.c.rank == rank, metric_keys.c.kind == "scalar"
            )
        ).scalars()
    )
