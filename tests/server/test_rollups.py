"""Scalar rollups against a real database: kept exact by ingest in any step order, built by
the 0006 migration for old points, and views from them that keep every spike and NaN."""

from __future__ import annotations

import math
import random
import time
from array import array
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from trimtab.protocol import Batch, Hello, RunRef, ScalarSeries
from trimtab.server.db import migrate
from trimtab.server.db.engine import make_engine
from trimtab.server.db.rollups import COLUMNS, LEVELS
from trimtab.server.db.store import Store
from trimtab.server.ingest import STORED, IngestWriter

Point = tuple[int, float, float]  # step, wall, value


@pytest.fixture
def store(migrated_db: str) -> Iterator[Store]:
    engine = make_engine(migrated_db)
    yield Store(engine)
    engine.dispose()


def _ingest(store: Store, batches: list[list[Point]], key: str = "loss") -> int:
    run_id, _ = store.open_run(Hello(RunRef("run-r", "proj", "name"), 1, "0", "host", 1, 0, 1, {}))
    writer = IngestWriter(store)
    writer.start()
    try:
        for seq, points in enumerate(batches, start=1):
            series = ScalarSeries(
                key,
                array("q", [p[0] for p in points]),
                array("d", [p[1] for p in points]),
                array("d", [p[2] for p in points]),
            )
            assert writer.submit(run_id, 0, Batch(seq, [series])).result(60) == STORED
    finally:
        writer.stop()
    return run_id


def _kind(v: float) -> str:
    return "nan" if v != v else "pinf" if v == math.inf else "ninf" if v == -math.inf else "finite"


def _brute_rollups(points: list[Point], level: int) -> dict[int, tuple[Any, ...]]:
    """Each bucket's row of COLUMNS from first principles; ``points`` in arrival order."""
    out: dict[int, tuple[Any, ...]] = {}
    for bucket in sorted({s >> level for s, _, _ in points}):
        pts = [p for p in points if p[0] >> level == bucket]  # arrival order kept
        finite = [p for p in pts if _kind(p[2]) == "finite"]
        lo = min(finite, key=lambda p: (p[2], p[0])) if finite else None
        hi = min(finite, key=lambda p: (-p[2], p[0])) if finite else None
        first = min(pts, key=lambda p: p[0])  # min/max keep the first arrival among ties
        last = max(reversed(pts), key=lambda p: p[0])  # the last arrival among ties
        row: list[Any] = [len(pts)]
        for ext in (lo, hi):
            row += [ext[2], ext[0], ext[1]] if ext else [None, None, None]
        row += [first[0], None if first[2] != first[2] else first[2], last[0], None if last[2] != last[2] else last[2]]
        marks: list[Any] = []
        for kind in ("nan", "pinf", "ninf"):
            of_kind = [p for p in pts if _kind(p[2]) == kind]
            row.append(len(of_kind))
            earliest = min(of_kind, key=lambda p: p[0]) if of_kind else None
            marks += [earliest[0], earliest[1]] if earliest else [None, None]
        out[bucket] = (*row, *marks)
    return out


def _stored_rollups(store: Store) -> dict[tuple[int, int], tuple[Any, ...]]:
    with store.engine.begin() as conn:
        rows = conn.execute(text(f"SELECT level, bucket, {', '.join(COLUMNS)} FROM scalar_rollups")).all()
    return {(r[0], r[1]): tuple(None if v != v else v for v in r[2:]) for r in rows}  # PostgreSQL NaN -> NULL


def _expected_rollups(points: list[Point]) -> dict[tuple[int, int], tuple[Any, ...]]:
    return {(level, b): row for level in LEVELS for b, row in _brute_rollups(points, level).items()}


def _wall(step: int) -> float:
    return 1.7e9 + step * 0.25


def test_rollups_equal_a_recomputation_after_batches_in_any_order(store: Store) -> None:
    rng = random.Random(3)

    def pts(steps: list[int]) -> list[Point]:
        out = []
        for s in steps:
            v = rng.choice([math.nan, math.inf, -math.inf]) if rng.random() < 0.03 else rng.uniform(-5, 5)
            out.append((s, _wall(s), v))
        return out

    batches = [
        pts(list(range(0, 3000))),
        pts(list(range(70_000, 71_000))),  # a gap, then out of order: earlier steps arrive later
        pts(list(range(3000, 5000))),
        pts(rng.sample(range(-500, 70_000), 800)),  # unordered, negative steps, repeated steps
        [(10, _wall(10), -100.0), (10, _wall(10), 100.0), (64, _wall(64), math.nan), (12, _wall(12), -100.0)],
        pts([5, 5, 5, 200_000]),
    ]
    _ingest(store, batches)
    assert _stored_rollups(store) == _expected_rollups([p for b in batches for p in b])


def test_the_0006_upgrade_backfills_rollups_for_stored_points(db_url: str) -> None:
    migrate.upgrade(db_url, "0005_autopilot_policies")
    rng = random.Random(8)
    steps = rng.sample(range(-3000, 150_000), 6000)  # distinct steps, in no order
    values = [rng.choice([math.nan, math.inf, -math.inf, 7.0]) if rng.random() < 0.05 else rng.random() for _ in steps]
    points = {3: [(s, _wall(s), v) for s, v in zip(steps, values, strict=True)], 4: [(1, 2.0, 0.5), (9, 3.0, 0.25)]}
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO scalar_points (key_id, step, wall_time, value) VALUES (:k, :s, :w, :v)"),
                [{"k": k, "s": s, "w": w, "v": v} for k, pts in points.items() for s, w, v in pts],
            )
        migrate.upgrade(db_url)
        assert migrate.current_revision(engine) == migrate.head_revision()
        with engine.begin() as conn:
            rows = conn.execute(text(f"SELECT key_id, level, bucket, {', '.join(COLUMNS)} FROM scalar_rollups")).all()
            assert conn.execute(text("SELECT count(*) FROM scalar_points")).scalar_one() == 6002
    finally:
        engine.dispose()
    stored = {(r[0], r[1], r[2]): tuple(None if v != v else v for v in r[3:]) for r in rows}
    expected = {
        (k, level, b): row
        for k, pts in points.items()
        for level in LEVELS
        for b, row in _brute_rollups(pts, level).items()
    }
    assert stored == expected


# ---------------------------------------------------------------- views


def _brute_view(points: list[Point], lo: int, hi: int, width: int) -> list[tuple[int, float]]:
    """(step, value) of the view of points lo..hi at ``width`` steps per bucket; ``points``
    sorted by step as the store returns them."""
    shift = width.bit_length() - 1
    out: list[tuple[int, float]] = []
    inside = [p for p in points if lo <= p[0] <= hi]
    for bucket in sorted({p[0] >> shift for p in inside}):
        pts = [p for p in inside if p[0] >> shift == bucket]
        finite = [p for p in pts if _kind(p[2]) == "finite"]
        chosen: list[tuple[int, float]] = []
        if finite:
            low = min(finite, key=lambda p: (p[2], p[0]))
            high = min(finite, key=lambda p: (-p[2], p[0]))
            chosen.append((low[0], low[2]))
            if (high[0], high[2]) != (low[0], low[2]):
                chosen.append((high[0], high[2]))
        for kind, value in (("nan", math.nan), ("pinf", math.inf), ("ninf", -math.inf)):
            of_kind = [p for p in pts if _kind(p[2]) == kind]
            if of_kind:
                chosen.append((of_kind[0][0], value))
        out += sorted(chosen, key=lambda c: c[0])
    return out


def _same(view: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    return len(view) == len(expected) and all(
        a[0] == b[0] and (a[1] == b[1] or (a[1] != a[1] and b[1] != b[1])) for a, b in zip(view, expected, strict=True)
    )


def _counts(points: list[Point], lo: int, hi: int) -> tuple[int, dict[str, int]]:
    inside = [p for p in points if lo <= p[0] <= hi]
    kinds = [_kind(p[2]) for p in inside]
    return len(inside), {"nan": kinds.count("nan"), "posinf": kinds.count("pinf"), "neginf": kinds.count("ninf")}


def test_a_spike_and_a_nan_show_in_every_view_of_a_long_series(store: Store) -> None:
    n, spike, nan_at = 200_000, 123_457, 31_003
    series = [(s, _wall(s), 1.0 + (s % 17) * 1e-3) for s in range(n)]
    series[spike] = (spike, _wall(spike), 1e9)
    series[nan_at] = (nan_at, _wall(nan_at), math.nan)
    run_id = _ingest(store, [series[i : i + 16384] for i in range(0, n, 16384)])

    full = store.scalar_view(run_id, "loss", None, None, 500)
    assert full.downsampled and len(full.steps) <= 500 and full.total_points == n
    assert full.nonfinite == {"nan": 1, "posinf": 0, "neginf": 0}
    assert _same(list(zip(full.steps, full.values, strict=True)), _brute_view(series, 0, n - 1, full.bucket_steps))
    for target in (spike, nan_at):
        for half in (100_000, 30_000, 5000, 1000, 300, 40, 3):
            for off in (0, 7, half // 3):  # unaligned ends
                lo, hi = target - half + off, target + half + off
                view = store.scalar_view(run_id, "loss", lo, hi, 500)
                assert len(view.steps) <= 500
                got = dict(zip(view.steps, view.values, strict=True))
                assert got[spike] == 1e9 if lo <= spike <= hi else spike not in got
                assert math.isnan(got[nan_at]) if lo <= nan_at <= hi else nan_at not in got
                assert (view.total_points, view.nonfinite) == _counts(series, lo, hi)
                if view.downsampled:
                    expected = _brute_view(series, lo, hi, view.bucket_steps)
                    assert _same(list(zip(view.steps, view.values, strict=True)), expected), (lo, hi)


def test_views_are_exact_at_the_edges_raw_when_they_fit_and_never_over_max_points(store: Store) -> None:
    rng = random.Random(11)
    steps = sorted(rng.sample(range(-20_000, 180_000), 40_000))
    series: list[Point] = []
    for s in steps:
        r = rng.random()
        v = math.nan if r < 0.01 else math.inf if r < 0.015 else -math.inf if r < 0.02 else rng.gauss(0, 1)
        series.append((s, _wall(s), v))
    run_id = _ingest(store, [series[i : i + 5000] for i in range(0, len(series), 5000)])
    t0 = time.monotonic()
    for _ in range(60):
        a, b = sorted(rng.randrange(-25_000, 185_000) for _ in range(2))
        max_points = rng.choice([2, 3, 10, 64, 500, 2000, 50_000])
        view = store.scalar_view(run_id, "loss", a, b, max_points)
        total, nonfinite = _counts(series, a, b)
        assert (view.total_points, view.nonfinite) == (total, nonfinite)
        assert len(view.steps) <= max_points
        assert view.steps == sorted(view.steps)
        if total <= max_points:  # the raw points, exactly
            raw = [p for p in series if a <= p[0] <= b]
            assert not view.downsampled and view.bucket_steps == 1
            assert _same(list(zip(view.steps, view.values, strict=True)), [(p[0], p[2]) for p in raw])
            assert view.walls == [p[1] for p in raw]
        elif max_points >= 10:  # too few points allowed: the view is cut short (no bucketing fits)
            expected = _brute_view(series, a, b, view.bucket_steps)
            assert _same(list(zip(view.steps, view.values, strict=True)), expected), (a, b, max_points)
    assert time.monotonic() - t0 < 120
    # since_step is exclusive, start_step inclusive: the API turns since_step s into start s + 1
    assert store.scalar_view(run_id, "loss", 10**12, None, 10).steps == []
