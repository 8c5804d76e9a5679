"""What the alert engine keeps: only scalars and nonfinite events are queued (real SQLite
and PostgreSQL)."""

from __future__ import annotations

import gc
import math
import time
import weakref
from array import array
from collections.abc import Iterator

import pytest

from tests.server.test_alert_engine import BASE_URL
from trimtab.protocol import Batch, Event, Histogram, ScalarSeries
from trimtab.server.alerts import AlertEngine
from trimtab.server.engine import make_engine
from trimtab.server.store import Store


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
