"""A step range of one scalar series as at most ``max_points`` points, read from the rollups.

A range holding at most ``max_points`` points comes back raw. A longer one is cut into
buckets of 2**k steps, k the smallest that gives at most ``max_points / 2`` buckets, and each
bucket shows its finite min and max points and its first NaN, +Inf and -Inf, at their real
steps: no spike and no non-finite value is ever averaged or sampled away. Full buckets come
from rollup rows (merged when k falls between two stored levels); a bucket cut by an end of
the range is summarised from the coarsest rollup blocks that fit inside the range plus the
few raw points left over, so the view is exact at its edges. Buckets narrower than the
finest level are summarised from raw points, when there are few enough to read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select, union_all

from trimtab.server.db.rollups import COLUMNS, FINEST, LEVELS, Agg, summarise
from trimtab.server.db.tables import scalar_points, scalar_rollups

# Buckets narrower than 2**FINEST steps are built from raw points only up to this many (about
# 50 ms of reading); past it the view uses the finest stored level instead.
RAW_SUMMARY_LIMIT = 50_000
# Past this width every step of the int64 range falls in two buckets at most.
MAX_SHIFT = 63

_ROLLUP_COLUMNS = [scalar_rollups.c[c] for c in COLUMNS]


@dataclass(frozen=True)
class ScalarView:
    steps: list[int]
    walls: list[float]
    values: list[float]  # NaN, +Inf and -Inf as floats
    total_points: int  # points in the range
    nonfinite: dict[str, int]  # of the points in the range: {"nan", "posinf", "neginf"}
    bucket_steps: int  # 1: raw points
    downsampled: bool


def read_view(conn: Connection, key_id: int, lo: int | None, hi: int | None, max_points: int) -> ScalarView:
    """The view of steps ``lo``..``hi`` (inclusive; None: unbounded) of one key."""
    r = scalar_rollups.c
    first, last = conn.execute(
        select(func.min(r.first_step), func.max(r.last_step)).where(r.key_id == key_id, r.level == LEVELS[-1])
    ).one()
    if first is None:
        return _empty()
    lo = first if lo is None else max(lo, first)
    hi = last if hi is None else min(hi, last)
    if lo > hi:
        return _empty()
    blocks, raw = cover(lo, hi)
    whole = _merge_all(_collect(conn, key_id, blocks, raw, MAX_SHIFT + 1).values())
    if whole is None:
        return _empty()
    nonfinite = {"nan": whole.nan_count, "posinf": whole.pinf_count, "neginf": whole.ninf_count}
    if whole.n_points <= max_points:
        steps, walls, values = _raw(conn, key_id, [(lo, hi)])
        return ScalarView(steps, walls, values, whole.n_points, nonfinite, 1, False)
    shift = 0
    while shift < MAX_SHIFT and 2 * ((hi >> shift) - (lo >> shift) + 1) > max_points:
        shift += 1
    if shift < FINEST and whole.n_points > RAW_SUMMARY_LIMIT:
        shift = FINEST
    while True:
        buckets = _buckets(conn, key_id, lo, hi, shift)
        points = _points(buckets[b] for b in sorted(buckets))
        if len(points) <= max_points:
            break
        if len(buckets) <= 1 or shift >= MAX_SHIFT:  # too few points allowed even for one bucket
            points = points[:max_points]
            break
        shift += 1  # the non-finite markers pushed it over: wider buckets
    steps = [p[0] for p in points]
    walls = [p[1] for p in points]
    values = [p[2] for p in points]
    return ScalarView(steps, walls, values, whole.n_points, nonfinite, 1 << shift, True)


def cover(lo: int, hi: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """Steps lo..hi as rollup blocks (level, first bucket, last bucket), as coarse as they
    fit, and the raw step ranges left over (under 2**FINEST steps at each end)."""
    blocks: list[tuple[int, int, int]] = []
    raw: list[tuple[int, int]] = []
    p = lo
    while p <= hi:
        for i in range(len(LEVELS) - 1, -1, -1):
            size = 1 << LEVELS[i]
            if p % size or p + size - 1 > hi:
                continue
            count = (hi - p + 1) // size
            if i + 1 < len(LEVELS):  # stop where the next level up becomes aligned
                up = 1 << LEVELS[i + 1]
                if p % up:
                    count = min(count, (up - p % up) // size)
            blocks.append((LEVELS[i], p >> LEVELS[i], (p >> LEVELS[i]) + count - 1))
            p += count * size
            break
        else:
            end = min(hi, ((p >> FINEST) + 1 << FINEST) - 1)
            raw.append((p, end))
            p = end + 1
    return blocks, raw


def _buckets(conn: Connection, key_id: int, lo: int, hi: int, shift: int) -> dict[int, Agg]:
    """Agg per bucket of 2**shift steps over lo..hi, each bucket cut to the range."""
    if shift < FINEST:
        steps, walls, values = _raw(conn, key_id, [(lo, hi)])
        return summarise(steps, walls, values, shift)
    blocks: list[tuple[int, int, int]] = []
    raw: list[tuple[int, int]] = []
    full_lo = -((-lo) >> shift)  # the first bucket starting at or after lo
    full_hi = ((hi + 1) >> shift) - 1  # the last bucket ending at or before hi
    if full_lo > full_hi:
        blocks, raw = cover(lo, hi)
    else:
        stored = max(level for level in LEVELS if level <= shift)
        blocks.append((stored, full_lo << (shift - stored), ((full_hi + 1) << (shift - stored)) - 1))
        for edge_lo, edge_hi in ((lo, (full_lo << shift) - 1), ((full_hi + 1) << shift, hi)):
            if edge_lo <= edge_hi:
                edge_blocks, edge_raw = cover(edge_lo, edge_hi)
                blocks += edge_blocks
                raw += edge_raw
    return _collect(conn, key_id, blocks, raw, shift)


def _collect(
    conn: Connection, key_id: int, blocks: list[tuple[int, int, int]], raw: list[tuple[int, int]], shift: int
) -> dict[int, Agg]:
    """The blocks' rollup rows and the raw ranges' points, merged per bucket of 2**shift steps
    (every block must lie within one such bucket or be made of whole ones)."""
    out: dict[int, Agg] = {}
    if blocks:
        r = scalar_rollups.c
        # One indexed range per block: SQLite would scan the key's rows for an OR of them.
        parts = [
            select(r.level, r.bucket, *_ROLLUP_COLUMNS).where(
                r.key_id == key_id, r.level == level, r.bucket.between(a, b)
            )
            for level, a, b in blocks
        ]
        for row in conn.execute(union_all(*parts) if len(parts) > 1 else parts[0]):
            _fold(out, ((row[1] << row[0]) >> shift) if shift <= MAX_SHIFT else 0, Agg.from_row(row[2:]))
    if raw:
        steps, walls, values = _raw(conn, key_id, raw)
        for bucket, agg in summarise(steps, walls, values, min(shift, MAX_SHIFT + 1)).items():
            _fold(out, bucket if shift <= MAX_SHIFT else 0, agg)
    return out


def _fold(out: dict[int, Agg], bucket: int, agg: Agg) -> None:
    have = out.get(bucket)
    if have is None:
        out[bucket] = agg
    else:
        have.merge(agg)


def _merge_all(aggs: Iterable[Agg]) -> Agg | None:
    total: Agg | None = None
    for agg in aggs:
        if total is None:
            total = agg
        else:
            total.merge(agg)
    return total


def _points(aggs: Iterable[Agg]) -> list[tuple[int, float, float]]:
    """(step, wall, value) of each bucket's min, max and first non-finite points, in step order."""
    out: list[tuple[int, float, float]] = []
    for a in aggs:
        chosen: list[tuple[int, float, float]] = []
        if a.min_step is not None:
            chosen.append((a.min_step, a.min_wall, a.min_value))  # type: ignore[arg-type]
        if a.max_step is not None and (a.max_step, a.max_value) != (a.min_step, a.min_value):
            chosen.append((a.max_step, a.max_wall, a.max_value))  # type: ignore[arg-type]
        if a.first_nan_step is not None:
            chosen.append((a.first_nan_step, a.first_nan_wall, math.nan))  # type: ignore[arg-type]
        if a.first_pinf_step is not None:
            chosen.append((a.first_pinf_step, a.first_pinf_wall, math.inf))  # type: ignore[arg-type]
        if a.first_ninf_step is not None:
            chosen.append((a.first_ninf_step, a.first_ninf_wall, -math.inf))  # type: ignore[arg-type]
        chosen.sort(key=lambda p: p[0])
        out += chosen
    return out


def _raw(conn: Connection, key_id: int, ranges: list[tuple[int, int]]) -> tuple[list[int], list[float], list[float]]:
    """The points in the step ranges, by step then wall time; NULL (SQLite's NaN) read as NaN."""
    p = scalar_points.c
    result: list[Any] = []
    for a, b in sorted(ranges):  # disjoint ranges, each read in order
        result += conn.execute(
            select(p.step, p.wall_time, p.value)
            .where(p.key_id == key_id, p.step.between(a, b))
            .order_by(p.step, p.wall_time)
        ).all()
    if not result:
        return [], [], []
    steps, walls, values = (list(col) for col in zip(*result, strict=True))
    nan = math.nan
    return steps, walls, [nan if v is None else v for v in values]


def _empty() -> ScalarView:
    return ScalarView([], [], [], 0, {"nan": 0, "posinf": 0, "neginf": 0}, 1, False)
