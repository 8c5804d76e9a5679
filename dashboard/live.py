"""Pure helpers for live charts: the ``extendData`` payload that appends new points to
existing traces without redrawing the figure."""

from __future__ import annotations

import math
from typing import Any

from trimtab.dashboard.client import Series


def extension(new: dict[int, Series]) -> tuple[dict[str, list[list[Any]]], list[int]] | None:
    """``extendData`` for line traces by index, or None when there is nothing to add.

    JSON has no NaN: a non-finite value goes out as None, which Plotly draws as a gap.
    """
    indices = [i for i, s in sorted(new.items()) if s.steps]
    if not indices:
        return None
    xs = [list(new[i].steps) for i in indices]
    ys = [[v if math.isfinite(v) else None for v in new[i].values] for i in indices]
    return {"x": xs, "y": ys}, indices


def has_nonfinite(series: Series) -> bool:
    return any(not math.isfinite(v) for v in series.values)
