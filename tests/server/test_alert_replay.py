"""What the alert engine keeps and replays: only scalars and nonfinite events are queued,
a catch-up reads every stored point it missed, and a new rule's look at the past alerts
nobody (real SQLite and PostgreSQL)."""

from __future__ import annotations

import gc
import math
import time
import weakref
from array import array
from collections.abc import Iterator

import pytest

from tests.server.test_alert_engine import BASE_URL, LOGITS, Rig, _project_id, add_sink, deliveries, steady
from trimtab.detectors import parse_rule
from trimtab.protocol import Batch, Event, Histogram, ScalarSeries
from trimtab.server.alerts.engine import AlertEngine
from trimtab.server.alerts.rules import RuleStore
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store


@pytest.fixture
def store(migrated_db: str) -> Iterator[Store]:
    engine = make_engine(migrated_db)
    yield Store(engine)
    engine.dispose()


def _histogram(key: str, step: int, bins: int) -> Histogram:
    return Histogram(key, step, time.time(), array("d", range(bins + 1)), array("q", [1] * bins), 0, 0, 0)


def _scalars(key: str, points: list[tuple[int, float]]) -> ScalarSeries:
    return ScalarSeries(
        key,
        array("q", [s for s, _ in points]),
        array("d", [time.time()] * len(points)),
        array("d", [v for _, v in points]),
    )


def test_the_queue_holds_scalars_and_nonfinite_events_only(store: Store) -> None:
    engine = AlertEngine(store, BASE_URL, queue_max_points=10)  # not started: what is queued stays
    hist = _histogram("grad/w", 0, 100_000)
    kept = weakref.ref(hist)
    nan = Event("nonfinite", 1, time.time(), "error", {"module": "fc"})
    other = Event("checkpoint", 1, time.time(), "info", {})
    engine.submit([(1, 0, Batch(1, [_scalars("loss", [(0, 1.0), (1, math.nan)])], [hist], [nan, other]))])
    engine.submit([(1, 0, Batch(2, [], [_histogram("grad/w", 1, 10)], [other]))])  # nothing for the engine
    del hist
    gc.collect()
    assert kept() is None  # the histogram was not kept
    assert engine.queued_points == 3 and engine.stats.catch_ups == 0  # 2 points and 1 nonfinite event
    storm = [Event("nonfinite", s, time.time(), "error", {}) for s in range(20)]
    engine.submit([(1, 0, Batch(3, [], [], storm))])  # events count toward the bound too
    assert engine.queued_points == 3 and engine.stats.catch_ups == 1


def test_a_catch_up_replays_every_point_it_missed(store: Store) -> None:
    add_sink(store)
    rig = Rig(store, queue_max_points=20, replay_max_points=50, replay_page_points=7)
    try:
        run_id = rig.run("flood")
        rig.send(run_id, {"loss": steady(0, 11)})  # fed through the queue
        big = [(s, math.nan if s == 100 else 1.0) for s in range(11, 300)]
        rig.send(run_id, {"loss": big})  # too big for the queue: replayed from the database
        assert rig.engine.stats.catch_ups == 1
        (alert,) = rig.alerts(run_id)
        assert (alert["rule"], alert["first_step"], alert["status"]) == ("nonfinite-loss", 100, "resolved")
        assert [e for _, e, _ in deliveries(store)] == ["firing", "resolved"]  # live data: notified
    finally:
        rig.stop()


def _add_rule(rig: Rig, store: Store, run_id: int, **fields: object) -> None:
    RuleStore(store).write("eng", None, parse_rule({**LOGITS, **fields}), replace=False)
    rig.engine.rules_changed(_project_id(store, run_id))


def test_a_new_rule_looking_at_the_past_notifies_nobody(store: Store) -> None:
    add_sink(store)
    rig = Rig(store, replay_max_points=50, replay_page_points=7)
    try:
        run_id = rig.run("history")
        rig.send(run_id, {"attn/max_logit": [(s, 150.0 if s in (1, 80) else 10.0) for s in range(100)]})
        _add_rule(rig, store, run_id, resolve_after_steps=1)
        rig.send(run_id, {"attn/max_logit": [(100, 10.0)]})
        # Only the newest 50 points were replayed (step 1 is older), and silently.
        (alert,) = rig.alerts(run_id)
        assert (alert["first_step"], alert["status"], alert["notified"]) == (80, "resolved", False)
        assert deliveries(store) == []
        rig.send(run_id, {"attn/max_logit": [(101, 150.0)]})  # live: a new alert, notified
        assert [a["notified"] for a in rig.alerts(run_id)] == [False, True]
        assert [e for _, e, _ in deliveries(store)] == ["firing"]
    finally:
        rig.stop()


def test_a_silent_alert_from_the_past_is_announced_when_live_data_keeps_firing(store: Store) -> None:
    add_sink(store)
    rig = Rig(store)
    try:
        run_id = rig.run("ongoing")
        rig.send(run_id, {"attn/max_logit": [(0, 150.0), (1, 150.0), (2, 150.0)]})
        _add_rule(rig, store, run_id)
        rig.send(run_id, {"attn/max_logit": [(3, 150.0)]})
        (alert,) = rig.alerts(run_id)
        assert (alert["first_step"], alert["count"], alert["notified"]) == (0, 4, True)
        [(alert_id, event, payload)] = deliveries(store)
        assert (alert_id, event, payload["count"]) == (alert["id"], "firing", 4)
    finally:
        rig.stop()
