"""Two alert engines ("replicas", each with its own ingest writer and connection pool) on one
database, fed the same runs alternately, as when an agent reconnects to another replica: the
database's alerts win over what either engine remembers (real SQLite and PostgreSQL)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from tests.server.test_alert_engine import Rig, add_sink, batch, deliveries, steady
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store
from trimtab.server.db.tables import detector_states


class Replicas:
    def __init__(self, db_url: str) -> None:
        self.stores = [Store(make_engine(db_url)), Store(make_engine(db_url))]
        self.a, self.b = (Rig(store) for store in self.stores)
        self.seqs: dict[int, int] = {}
        self.running = [self.a, self.b]

    def send(self, rig: Rig, run_id: int, series: dict[str, list[tuple[int, float]]]) -> None:
        """Through ``rig``'s writer, with the run's seqs going on from wherever they were sent."""
        seq = self.seqs[run_id] = self.seqs.get(run_id, 0) + 1
        rig.writer.submit(run_id, 0, batch(seq, series)).result(30)
        assert rig.engine.flush()

    def stop(self, rig: Rig) -> None:
        """Stop a replica's writer and engine (which saves every detector state)."""
        self.running.remove(rig)
        rig.stop()

    def close(self) -> None:
        for rig in list(self.running):
            self.stop(rig)
        for store in self.stores:
            store.engine.dispose()


@pytest.fixture
def replicas(migrated_db: str) -> Iterator[Replicas]:
    r = Replicas(migrated_db)
    yield r
    r.close()


def _alerts(r: Replicas, run_id: int) -> list[tuple[Any, ...]]:
    return [(a["status"], a["resolve_reason"], a["first_step"], a["last_step"], a["count"]) for a in r.a.alerts(run_id)]


def test_a_finding_never_folds_into_an_alert_another_replica_resolved(replicas: Replicas) -> None:
    r = replicas
    add_sink(r.a.store)
    run_id = r.a.run("resumed")
    r.send(r.a, run_id, {"loss": [(0, math.nan)]})  # A opens the alert
    r.b.engine.run_finished(run_id)  # B resolves it (the run's bye reached B; the run goes on later)
    assert r.b.engine.flush()
    r.send(r.a, run_id, {"loss": [(1, math.nan)]})  # A still remembers it firing
    assert _alerts(r, run_id) == [("resolved", "run_finished", 0, 0, 1), ("firing", None, 1, 1, 1)]

    moved = r.a.run("moved")
    r.send(r.a, moved, {"loss": [(0, math.nan)]})
    r.send(r.b, moved, {"loss": steady(1, 102)})  # B resolves it: 100 quiet steps
    r.send(r.a, moved, {"loss": [(102, math.nan)]})
    assert _alerts(r, moved) == [("resolved", "quiet", 0, 0, 1), ("firing", None, 102, 102, 1)]
    # Each run: the first alert's firing and resolution; the second alert opened in cooldown.
    assert [e for _, e, _ in deliveries(r.a.store)] == ["firing", "resolved", "firing", "resolved"]


def test_a_finding_folds_into_the_alert_another_replica_opened(replicas: Replicas) -> None:
    r = replicas
    run_id = r.a.run("both")
    r.send(r.a, run_id, {"loss": steady(0, 5)})  # A knows the slot, with no alert
    r.send(r.b, run_id, {"loss": [(5, math.nan)]})  # B opens one
    r.send(r.a, run_id, {"loss": [(6, math.nan)]})
    assert _alerts(r, run_id) == [("firing", None, 5, 6, 2)]


def test_an_older_detector_state_does_not_replace_a_newer_one(replicas: Replicas) -> None:
    r = replicas
    run_id = r.a.run("states")
    r.send(r.a, run_id, {"loss": steady(0, 5)})
    r.send(r.b, run_id, {"loss": steady(5, 50)})
    r.stop(r.b)  # saves its state: step 49
    r.stop(r.a)  # A's is at step 4
    with r.a.store.transaction() as conn:
        step = conn.execute(
            select(detector_states.c.step).where(
                detector_states.c.run_id == run_id, detector_states.c.rule_name == "nonfinite-loss"
            )
        ).scalar()
    assert step == 49
