"""Alerts of runs that ended resolve: a finished run's, whether or not its end-of-run
resolution went through (retried after a database failure, or found by the periodic sweep),
and a run that stopped without a bye once it has not been seen for a while (real SQLite and
PostgreSQL)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import update

from tests.helpers import wait_until
from tests.server.test_alert_engine import Rig, add_sink, deliveries
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store
from trimtab.server.db.tables import alerts, runs


def _status(rig: Rig, run_id: int) -> tuple[str, str | None]:
    (alert,) = rig.alerts(run_id)
    return alert["status"], alert["resolve_reason"]


@contextmanager
def engine_store(db_url: str, lock_timeout_s: float = 30.0) -> Iterator[Store]:
    store = Store(make_engine(db_url, lock_timeout_s=lock_timeout_s))
    try:
        yield store
    finally:
        store.engine.dispose()


def test_a_run_not_seen_for_an_hour_has_its_alerts_resolved(migrated_db: str) -> None:
    with engine_store(migrated_db) as store:
        add_sink(store)
        rig = Rig(store, sweep_interval_s=0.05)
        try:
            dead, alive = rig.run("died"), rig.run("alive")
            for run_id in (dead, alive):
                rig.send(run_id, {"loss": [(0, 1.0), (1, math.nan)]})
            with store.transaction() as conn:  # no data and no heartbeat since
                conn.execute(update(runs).where(runs.c.id == dead).values(last_seen_at=time.time() - 3700))
            wait_until(lambda: _status(rig, dead)[0] == "resolved", 30, "the sweep")
            assert _status(rig, dead) == ("resolved", "run_stale")
            assert _status(rig, alive) == ("firing", None)  # seen just now
            assert sorted(e for _, e, _ in deliveries(store)) == ["firing", "firing", "resolved"]
        finally:
            rig.stop()


def test_a_finished_run_whose_end_the_engine_missed_has_its_alerts_resolved(migrated_db: str) -> None:
    with engine_store(migrated_db) as store:
        rig = Rig(store, sweep_interval_s=0.05)
        try:
            run_id = rig.run("ended")
            rig.send(run_id, {"loss": [(0, math.nan)]})
            store.finish_run(run_id)  # rank 0's bye, stored; the engine is not told (another replica's)
            wait_until(lambda: _status(rig, run_id)[0] == "resolved", 30, "the sweep")
            assert _status(rig, run_id) == ("resolved", "run_finished")
        finally:
            rig.stop()


def test_end_of_run_resolution_is_retried_after_a_database_failure(migrated_db: str) -> None:
    # No sweep during the test: only the retry can resolve it.
    with engine_store(migrated_db, lock_timeout_s=0.2) as store:
        rig = Rig(store, state_interval_s=0.05, sweep_interval_s=3600)
        locker = make_engine(migrated_db)
        try:
            run_id = rig.run("locked")
            rig.send(run_id, {"loss": [(0, math.nan)]})
            (alert,) = rig.alerts(run_id)
            with locker.connect() as conn:
                # Another transaction holds the alert's row (SQLite: the write lock) until rollback.
                conn.execute(update(alerts).where(alerts.c.id == alert["id"]).values(updated_at=time.time()))
                failures = rig.engine.stats.failures
                rig.engine.run_finished(run_id)
                wait_until(lambda: rig.engine.stats.failures > failures, 30, "the resolution to fail")
                conn.rollback()
            wait_until(lambda: _status(rig, run_id)[0] == "resolved", 30, "the retry")
            assert _status(rig, run_id) == ("resolved", "run_finished")
        finally:
            rig.stop()
            locker.dispose()
