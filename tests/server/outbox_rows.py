"""Rows for delivery tests: a project, a run and an alert written with SQL (as the alert engine
would), sinks made through the sink store, and the outbox read back."""

from __future__ import annotations

import math
import time
from typing import Any

from sqlalchemy import insert, select

from trimtab.server.alerts import outbox
from trimtab.server.alerts.sinks import SinkStore
from trimtab.server.db.store import Store
from trimtab.server.db.tables import alert_deliveries, alerts, projects, runs

SECRET = "whsec_test_secret_0123456789"


def seed_alert(store: Store, project: str = "proj", run_name: str = "run-a", rule: str = "nonfinite-loss") -> int:
    """A firing alert of a fresh run in ``project``; returns its id."""
    now = time.time()
    with store.transaction() as conn:
        project_id, _ = store.get_or_create(conn, projects, {"name": project}, {"created_at": now}, conflict=["name"])
        run_id = conn.execute(
            insert(runs)
            .values(
                uid=f"{project}-{run_name}-{now}",
                project_id=project_id,
                name=run_name,
                status="running",
                created_at=now,
                last_seen_at=now,
                config={},
                drops={},
            )
            .returning(runs.c.id)
        ).scalar_one()
        alert_id = conn.execute(
            insert(alerts)
            .values(
                run_id=run_id,
                project_id=project_id,
                rank=0,
                rule_name=rule,
                key="loss",
                detector="nonfinite",
                severity="critical",
                status="firing",
                message="loss is NaN at step 41",
                remedy="Lower the learning rate; check the batch.",
                value=None,
                baseline=2.5,
                first_step=41,
                last_step=41,
                fired_at=now,
                updated_at=now,
                count=1,
                notified=True,
                data={},
            )
            .returning(alerts.c.id)
        ).scalar_one()
    return int(alert_id)


def payload(store: Store, alert_id: int, status: str = "firing") -> dict[str, Any]:
    """The alert as the engine describes it to sinks (value NaN, as a float)."""
    with store.transaction() as conn:
        row = conn.execute(
            select(alerts, projects.c.name.label("project"), runs.c.name.label("run_name"), runs.c.uid)
            .join(projects, projects.c.id == alerts.c.project_id)
            .join(runs, runs.c.id == alerts.c.run_id)
            .where(alerts.c.id == alert_id)
        ).one()
    return {
        "id": alert_id,
        "project": row.project,
        "run_id": row.run_id,
        "run_name": row.run_name,
        "run_uid": row.uid,
        "rank": row.rank,
        "rule": row.rule_name,
        "key": row.key,
        "detector": row.detector,
        "severity": row.severity,
        "status": status,
        "message": row.message,
        "remedy": row.remedy,
        "value": math.nan,
        "baseline": row.baseline,
        "first_step": row.first_step,
        "last_step": row.last_step,
        "count": row.count,
        "fired_at": row.fired_at,
        "resolved_at": None,
        "url": f"http://trimtab.example/runs/{row.run_id}",
    }


def queue(store: Store, alert_id: int, event: str = "firing") -> int:
    """Enqueue the alert's notification, as the engine does after writing it."""
    body = payload(store, alert_id, "resolved" if event == "resolved" else "firing")
    with store.transaction() as conn:
        return outbox.enqueue(conn, alert_id, event, body)


def add_sink(store: Store, url: str, kind: str = "webhook", project: str | None = None, enabled: bool = True) -> int:
    sink = SinkStore(store).create(kind, url, SECRET if kind == "webhook" else None, project, None, enabled)
    return int(sink["id"])


def deliveries(store: Store) -> list[Any]:
    with store.transaction() as conn:
        return list(conn.execute(select(alert_deliveries).order_by(alert_deliveries.c.id)).all())
