"""The overview's live updates as pure functions: what one tick does, given what the figure
holds (``state``, written by each redraw), what the ticks appended since (``seen``) and what
the API says now. The Dash callback only fetches and wires (pages/overview.py).

A tick either asks for a redraw (the first drawing, new markers, a chart's first points, a
figure grown past its view), does nothing (zoomed, or no data), or appends the points after
the last step each trace holds with ``extendData``. A redraw is asked once per reason and
again only after ``REASK_S``: asking while one runs would cancel it, and a NaN logged every
step must not redraw every second (its points go in as gaps meanwhile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trimtab.dashboard.client import Series

VIEW_POINTS = 2000  # per series: what a chart a few thousand pixels wide can show
REASK_S = 5.0  # a redraw asked for that has not come (it failed, or was dropped) is asked again

Seen = dict[str, Any]  # {"rev", "last": {key: step}, "appended", "asked", "asked_at", "nonfinite_pending"}


@dataclass(frozen=True)
class Tick:
    """A tick's outputs: ``extendData`` (None: nothing to append), the new ``seen`` (None:
    unchanged) and a redraw request (None: none)."""

    extend: Any = None
    seen: Seen | None = None
    rebuild: str | None = None


@dataclass(frozen=True)
class Fetch:
    """Append: read each trace's key after the step it holds, then call :func:`appended`."""

    seen: Seen
    since: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # key -> (trace, held step)


def decide(
    state: dict[str, Any], seen: Seen | None, last_step: int | None, sig: str, shown: list[str], now: float
) -> Tick | Fetch:
    """The tick before any points are read. ``last_step``: the run's; ``sig``: the markers'
    signature now; ``shown``: the keys the charts would show now."""
    if "rev" not in state:  # the first drawing is on its way, or failed: ask again later
        return redraw_once(seen or {}, "first", now)
    if not seen or seen.get("rev") != state["rev"]:  # a new figure: start from what it holds
        kept: Seen = {k: seen[k] for k in ("asked", "asked_at") if seen and k in seen}
        seen = {**kept, "rev": state["rev"], "last": state["last"], "appended": 0}
    if sig != state["sig"]:
        return redraw_once(seen, sig, now)
    if sorted(shown) != sorted(state["traces"]):  # a chart's first points (e.g. opened before them)
        return redraw_once(seen, f"{sig}|keys:{','.join(sorted(shown))}", now)
    if state.get("range") or last_step is None:
        return Tick()  # zoomed (live updates paused), or nothing logged yet
    if seen.get("appended", 0) > VIEW_POINTS:  # the figure outgrew its view: a fresh one
        return redraw_once(seen, "grown", now)
    held = seen["last"]
    since = {
        key: (idx, held.get(key))
        for key, idx in state["traces"].items()
        if held.get(key) is None or held[key] < last_step
    }
    return Fetch(seen, since)


def appended(seen: Seen, new: dict[int, Series], now: float) -> Tick:
    """The tick after the points were read: ``new`` maps a trace index to its new points."""
    ext = extension(new)  # NaN/Inf go in as gaps; a redraw adds their markers
    last = dict(seen["last"])
    for s in new.values():
        if s.steps:
            last[s.key] = s.last_step
    grown = seen.get("appended", 0) + max((len(s.steps) for s in new.values()), default=0)
    seen = {**seen, "last": last, "appended": grown}
    if any(has_nonfinite(s) for s in new.values()) or seen.get("nonfinite_pending"):
        asked = redraw_once(seen, "nonfinite", now)
        # Throttled: ask again later, so the last NaN of a burst still gets its marker.
        if asked.rebuild is None:
            seen = {**seen, "nonfinite_pending": True}
        else:
            assert asked.seen is not None
            seen = {**asked.seen, "nonfinite_pending": 0}
        return Tick(ext, seen, asked.rebuild)
    if ext is None:
        return Tick()
    return Tick(ext, seen)


def redraw_once(seen: Seen, reason: str, now: float) -> Tick:
    """Ask for a redraw once per reason, and again only after ``REASK_S``."""
    if seen.get("asked") == reason and now - float(seen.get("asked_at", 0)) < REASK_S:
        return Tick()
    return Tick(seen={**seen, "asked": reason, "asked_at": now}, rebuild=f"{reason}@{now}")


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
