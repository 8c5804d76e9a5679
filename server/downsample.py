"""Downsampling that keeps what people look for: extremes and non-finite values.

The step range is cut into equal-width buckets; each bucket keeps the points holding its
finite minimum and maximum (so no spike is ever averaged or sampled away), plus the first
NaN, the first +Inf and the first -Inf it contains. Output stays in step order and never
holds more than ``max_points`` points: when non-finite markers would push it over, the
buckets are made wider and the selection is redone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def select_indices(steps: Sequence[int], values: Sequence[float], max_points: int) -> list[int]:
    """Indices of the points to keep, ascending. ``steps`` must be sorted ascending."""
    n = len(steps)
    if n <= max_points:
        return list(range(n))
    buckets = max(1, max_points // 2)
    while True:
        keep = _select(steps, values, buckets)
        if len(keep) <= max_points or buckets == 1:
            return keep[:max_points]
        buckets = max(1, min(buckets - 1, int(buckets * max_points / len(keep))))


def _select(steps: Sequence[int], values: Sequence[float], buckets: int) -> list[int]:
    n = len(steps)
    first, last = steps[0], steps[-1]
    width = (last - first + 1) / buckets
    keep: list[int] = []
    i = 0
    while i < n:
        bucket = int((steps[i] - first) / width)
        lo_i = hi_i = -1
        lo = hi = 0.0
        markers: dict[str, int] = {}
        j = i
        while j < n and int((steps[j] - first) / width) == bucket:
            v = values[j]
            if v != v or v in (math.inf, -math.inf):
                kind = "nan" if v != v else ("pinf" if v > 0 else "ninf")
                markers.setdefault(kind, j)
            else:
                if lo_i < 0 or v < lo:
                    lo, lo_i = v, j
                if hi_i < 0 or v > hi:
                    hi, hi_i = v, j
            j += 1
        chosen = {k for k in (lo_i, hi_i) if k >= 0}
        chosen.update(markers.values())
        keep.extend(sorted(chosen))
        i = j
    return keep


def count_nonfinite(values: Sequence[float]) -> dict[str, int]:
    nan = pinf = ninf = 0
    for v in values:
        if v != v:
            nan += 1
        elif v == math.inf:
            pinf += 1
        elif v == -math.inf:
            ninf += 1
    return {"nan": nan, "posinf": pinf, "neginf": ninf}
