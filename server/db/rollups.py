"""Scalar rollups: per-bucket summaries of ``scalar_points`` at a few power-of-two widths.

A bucket of level L holds the steps whose ``step >> L`` is the same. Its summary (``Agg``)
keeps the point count, the finite minimum and maximum with the step and wall time where
each first occurs, the first and last point, and per kind of non-finite value (NaN, +Inf,
-Inf) its count and its first step and wall time. Summaries merge exactly, in any order,
so a batch is folded in with one upsert per touched bucket whatever order steps arrive in,
and a coarse bucket can be built from finer ones.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

# Bucket widths 64, 256, ... 65536 steps. A factor of 4 between levels means a view reads at
# most 4x the rows it shows (it merges adjacent rows of the level below the width it wants),
# and each level costs ingest about one upsert per key per batch, so six levels keep ingest
# cheap. Below 64 steps a view reads raw points (at most 32 x max_points steps' worth);
# above 65536 it merges level-16 rows, which are few even for a billion steps.
LEVELS = (6, 8, 10, 12, 14, 16)
FINEST = LEVELS[0]

INF = math.inf

# The columns of scalar_rollups after (key_id, level, bucket), in Agg.row() order.
COLUMNS = (
    "n_points",
    "min_value",
    "min_step",
    "min_wall",
    "max_value",
    "max_step",
    "max_wall",
    "first_step",
    "first_value",
    "last_step",
    "last_value",
    "nan_count",
    "pinf_count",
    "ninf_count",
    "first_nan_step",
    "first_nan_wall",
    "first_pinf_step",
    "first_pinf_wall",
    "first_ninf_step",
    "first_ninf_wall",
)


class Agg:
    """The summary of the points of one bucket (or of any set of points)."""

    __slots__ = COLUMNS

    n_points: int
    min_value: float | None  # None: no finite value
    min_step: int | None
    min_wall: float | None
    max_value: float | None
    max_step: int | None
    max_wall: float | None
    first_step: int
    first_value: float  # may be NaN
    last_step: int
    last_value: float
    nan_count: int
    pinf_count: int
    ninf_count: int
    first_nan_step: int | None
    first_nan_wall: float | None
    first_pinf_step: int | None
    first_pinf_wall: float | None
    first_ninf_step: int | None
    first_ninf_wall: float | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Agg:
        """From the COLUMNS of a scalar_rollups row (NULL first/last values are NaN)."""
        agg = cls.__new__(cls)
        for name, value in zip(COLUMNS, row, strict=True):
            setattr(agg, name, value)
        if agg.first_value is None:
            agg.first_value = math.nan
        if agg.last_value is None:
            agg.last_value = math.nan
        return agg

    def row(self) -> tuple[Any, ...]:
        """COLUMNS as bound: NaN becomes NULL, the stored form of NaN on both backends."""
        first = None if self.first_value != self.first_value else self.first_value
        last = None if self.last_value != self.last_value else self.last_value
        return (
            self.n_points,
            self.min_value,
            self.min_step,
            self.min_wall,
            self.max_value,
            self.max_step,
            self.max_wall,
            self.first_step,
            first,
            self.last_step,
            last,
            self.nan_count,
            self.pinf_count,
            self.ninf_count,
            self.first_nan_step,
            self.first_nan_wall,
            self.first_pinf_step,
            self.first_pinf_wall,
            self.first_ninf_step,
            self.first_ninf_wall,
        )

    def merge(self, other: Agg) -> None:
        """Fold ``other`` in; the same rules as the ingest upsert (``UPSERT_SET``).

        Ties go to the earlier step, so the result is the same in any merge order (for the
        first and last point at a repeated step, ``other`` counts as the later one)."""
        self.n_points += other.n_points
        o = other.min_value
        if o is not None and (
            self.min_value is None or o < self.min_value or (o == self.min_value and other.min_step < self.min_step)  # type: ignore[operator]
        ):
            self.min_value, self.min_step, self.min_wall = o, other.min_step, other.min_wall
        o = other.max_value
        if o is not None and (
            self.max_value is None or o > self.max_value or (o == self.max_value and other.max_step < self.max_step)  # type: ignore[operator]
        ):
            self.max_value, self.max_step, self.max_wall = o, other.max_step, other.max_wall
        if other.first_step < self.first_step:
            self.first_step, self.first_value = other.first_step, other.first_value
        if other.last_step >= self.last_step:
            self.last_step, self.last_value = other.last_step, other.last_value
        self.nan_count += other.nan_count
        self.pinf_count += other.pinf_count
        self.ninf_count += other.ninf_count
        s = other.first_nan_step
        if s is not None and (self.first_nan_step is None or s < self.first_nan_step):
            self.first_nan_step, self.first_nan_wall = s, other.first_nan_wall
        s = other.first_pinf_step
        if s is not None and (self.first_pinf_step is None or s < self.first_pinf_step):
            self.first_pinf_step, self.first_pinf_wall = s, other.first_pinf_wall
        s = other.first_ninf_step
        if s is not None and (self.first_ninf_step is None or s < self.first_ninf_step):
            self.first_ninf_step, self.first_ninf_wall = s, other.first_ninf_wall


def _summarise(
    steps: Sequence[int], walls: Sequence[float], values: Sequence[float], i: int, j: int, finite: bool
) -> Agg:
    """The Agg of points i..j-1 of a series sorted by step (stable, so ties keep arrival order);
    ``finite``: the caller knows every value is finite."""
    agg = Agg.__new__(Agg)
    agg.n_points = j - i
    agg.first_step, agg.first_value = steps[i], values[i]
    agg.last_step, agg.last_value = steps[j - 1], values[j - 1]
    part = values[i:j]
    if not finite:
        total = sum(part)
        finite = total - total == 0.0  # one NaN or infinity makes it NaN (as may an overflow)
    if finite:  # C-speed min, max and index
        lo, hi = min(part), max(part)
        li, hi_i = i + part.index(lo), i + part.index(hi)
        agg.min_value, agg.min_step, agg.min_wall = lo, steps[li], walls[li]
        agg.max_value, agg.max_step, agg.max_wall = hi, steps[hi_i], walls[hi_i]
        agg.nan_count = agg.pinf_count = agg.ninf_count = 0
        agg.first_nan_step = agg.first_nan_wall = agg.first_pinf_step = agg.first_pinf_wall = None
        agg.first_ninf_step = agg.first_ninf_wall = None
        return agg
    agg.min_value = agg.min_step = agg.min_wall = agg.max_value = agg.max_step = agg.max_wall = None
    agg.nan_count = agg.pinf_count = agg.ninf_count = 0
    agg.first_nan_step = agg.first_nan_wall = agg.first_pinf_step = agg.first_pinf_wall = None
    agg.first_ninf_step = agg.first_ninf_wall = None
    for k in range(i, j):
        v = values[k]
        if v != v:
            agg.nan_count += 1
            if agg.first_nan_step is None:
                agg.first_nan_step, agg.first_nan_wall = steps[k], walls[k]
        elif v == INF:
            agg.pinf_count += 1
            if agg.first_pinf_step is None:
                agg.first_pinf_step, agg.first_pinf_wall = steps[k], walls[k]
        elif v == -INF:
            agg.ninf_count += 1
            if agg.first_ninf_step is None:
                agg.first_ninf_step, agg.first_ninf_wall = steps[k], walls[k]
        else:
            if agg.min_value is None or v < agg.min_value:
                agg.min_value, agg.min_step, agg.min_wall = v, steps[k], walls[k]
            if agg.max_value is None or v > agg.max_value:
                agg.max_value, agg.max_step, agg.max_wall = v, steps[k], walls[k]
    return agg


def summarise(steps: Sequence[int], walls: Sequence[float], values: Sequence[float], level: int) -> dict[int, Agg]:
    """The points' Agg per bucket (``step >> level``), in any step order."""
    n = len(steps)
    if n == 0:
        return {}
    ordered = sorted(steps)  # timsort checks an ordered run in one C pass: steps usually arrive in order
    if ordered != list(steps):
        order = sorted(range(n), key=steps.__getitem__)
        steps = [steps[k] for k in order]
        walls = [walls[k] for k in order]
        values = [values[k] for k in order]
    total = sum(values)
    finite = total - total == 0.0  # the common case: no bucket needs to look for non-finite values
    out: dict[int, Agg] = {}
    i = 0
    while i < n:
        bucket = steps[i] >> level
        j = bisect_left(steps, (bucket + 1) << level, i)
        out[bucket] = _summarise(steps, walls, values, i, j, finite)
        i = j
    return out


def coarsen(finer: dict[int, Agg], shift: int) -> dict[int, Agg]:
    """Buckets ``shift`` levels coarser, merged from ``finer`` (which is left as it was)."""
    out: dict[int, Agg] = {}
    for bucket in sorted(finer):
        agg = finer[bucket]
        parent = out.get(bucket >> shift)
        if parent is None:
            out[bucket >> shift] = _copy(agg)
        else:
            parent.merge(agg)
    return out


def _copy(agg: Agg) -> Agg:
    new = Agg.__new__(Agg)
    new.n_points, new.first_step, new.first_value = agg.n_points, agg.first_step, agg.first_value
    new.last_step, new.last_value = agg.last_step, agg.last_value
    new.min_value, new.min_step, new.min_wall = agg.min_value, agg.min_step, agg.min_wall
    new.max_value, new.max_step, new.max_wall = agg.max_value, agg.max_step, agg.max_wall
    new.nan_count, new.pinf_count, new.ninf_count = agg.nan_count, agg.pinf_count, agg.ninf_count
    new.first_nan_step, new.first_nan_wall = agg.first_nan_step, agg.first_nan_wall
    new.first_pinf_step, new.first_pinf_wall = agg.first_pinf_step, agg.first_pinf_wall
    new.first_ninf_step, new.first_ninf_wall = agg.first_ninf_step, agg.first_ninf_wall
    return new


class RollupBatch:
    """The rollup rows of one ingest transaction, merged per (key_id, level, bucket)."""

    def __init__(self) -> None:
        self._aggs: dict[tuple[int, int, int], Agg] = {}

    def add(self, key_id: int, steps: Sequence[int], walls: Sequence[float], values: Sequence[float]) -> None:
        level_aggs = summarise(steps, walls, values, FINEST)
        previous = FINEST
        for level in LEVELS:
            if level != previous:
                level_aggs = coarsen(level_aggs, level - previous)
                previous = level
            for bucket, agg in level_aggs.items():
                ident = (key_id, level, bucket)
                have = self._aggs.get(ident)
                if have is None:
                    self._aggs[ident] = agg
                else:
                    have.merge(agg)

    def rows(self) -> list[tuple[Any, ...]]:
        return [(*ident, *agg.row()) for ident, agg in self._aggs.items()]


# How an upsert folds a new summary (``excluded``) into the stored one (``r``): the rules of
# Agg.merge. SET expressions all read the row as it was, on SQLite and PostgreSQL alike.
_MIN_WINS = (
    "excluded.min_value IS NOT NULL AND (r.min_value IS NULL OR excluded.min_value < r.min_value"
    " OR (excluded.min_value = r.min_value AND excluded.min_step < r.min_step))"
)
_MAX_WINS = (
    "excluded.max_value IS NOT NULL AND (r.max_value IS NULL OR excluded.max_value > r.max_value"
    " OR (excluded.max_value = r.max_value AND excluded.max_step < r.max_step))"
)


def _earlier(col: str) -> str:
    return f"excluded.{col} IS NOT NULL AND (r.{col} IS NULL OR excluded.{col} < r.{col})"


def _pick(cond: str, col: str) -> str:
    return f"{col} = CASE WHEN {cond} THEN excluded.{col} ELSE r.{col} END"


UPSERT_SET = ", ".join(
    [
        *(f"{c} = r.{c} + excluded.{c}" for c in ("n_points", "nan_count", "pinf_count", "ninf_count")),
        *(_pick(_MIN_WINS, c) for c in ("min_value", "min_step", "min_wall")),
        *(_pick(_MAX_WINS, c) for c in ("max_value", "max_step", "max_wall")),
        *(_pick("excluded.first_step < r.first_step", c) for c in ("first_step", "first_value")),
        *(_pick("excluded.last_step >= r.last_step", c) for c in ("last_step", "last_value")),
        *(
            _pick(_earlier(f"first_{kind}_step"), f"first_{kind}_{part}")
            for kind in ("nan", "pinf", "ninf")
            for part in ("step", "wall")
        ),
    ]
)
_ALL = ("key_id", "level", "bucket", *COLUMNS)
_TARGET = f"INSERT INTO scalar_rollups AS r ({', '.join(_ALL)})"
_CONFLICT = f"ON CONFLICT (key_id, level, bucket) DO UPDATE SET {UPSERT_SET}"
SQLITE_UPSERT = f"{_TARGET} VALUES ({', '.join('?' * len(_ALL))}) {_CONFLICT}"
# PostgreSQL: one statement for the whole transaction, its rows as arrays (each key once, as
# ON CONFLICT requires; RollupBatch merged them).
_PG_TYPES = ("int4", "int4", "int8", *("float8" if c.endswith(("value", "wall")) else "int8" for c in COLUMNS))
PG_UPSERT = f"{_TARGET} SELECT * FROM unnest({', '.join(f'%s::{t}[]' for t in _PG_TYPES)}) {_CONFLICT}"


def write(conn: Connection, sqlite: bool, batch: RollupBatch) -> None:
    """Upsert the batch's rollup rows through the raw driver, inside ``conn``'s transaction."""
    rows = batch.rows()
    if not rows:
        return
    raw: Any = conn.connection.dbapi_connection
    cur = raw.cursor()
    try:
        if sqlite:
            cur.executemany(SQLITE_UPSERT, rows)
        else:
            cur.execute(PG_UPSERT, [list(col) for col in zip(*rows, strict=True)])
    finally:
        cur.close()
