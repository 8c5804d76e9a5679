"""Heatmaps over steps, as pure functions: per-layer series (gradient norms, update ratios)
and histograms over time (weights, gradients, activations).

Binning onto a common step grid keeps each cell's largest value, so a spike in one layer
is never averaged away; a cell holding a NaN/Inf is left blank and marked with an x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from itertools import pairwise

import plotly.graph_objects as go

from trimtab.dashboard.client import Histogram, Series

NONFINITE_COLOR = "#d62728"


@dataclass(frozen=True)
class Grid:
    """Per-row cells over a shared step grid: the largest finite value per cell, None where
    no point fell, and the cells that held a non-finite value."""

    rows: list[str]
    columns: list[int]  # each column's first step
    width: int  # steps per column
    z: list[list[float | None]]
    nonfinite: list[tuple[int, int, str]]  # (row, column, NaN | +Inf | -Inf)


def step_grid(series: list[Series], columns: int) -> Grid:
    steps = [s for ser in series for s in ser.steps]
    if not steps:
        return Grid([ser.key for ser in series], [], 1, [[] for _ in series], [])
    lo, hi = min(steps), max(steps)
    # No more columns than a typical row has points: with more, rows whose points fall at
    # different steps (each bucket's min and max) leave cells empty and the map striped.
    typical = sorted(len(ser.steps) for ser in series)[len(series) // 2]
    columns = max(1, min(columns, typical))
    # Nor narrower than the API's buckets: a bucket's points (its min and max) sit anywhere in it.
    width = max(1, math.ceil((hi - lo + 1) / columns), *(ser.bucket_steps for ser in series))
    n = (hi - lo) // width + 1
    z: list[list[float | None]] = []
    bad: list[tuple[int, int, str]] = []
    for r, ser in enumerate(series):
        row: list[float | None] = [None] * n
        flagged: set[int] = set()
        for s, v in zip(ser.steps, ser.values, strict=True):
            c = (s - lo) // width
            if not math.isfinite(v):
                if c not in flagged:
                    flagged.add(c)
                    bad.append((r, c, "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")))
                continue
            cur = row[c]
            if cur is None or v > cur:
                row[c] = v
        for c in flagged:
            row[c] = None
        z.append(row)
    # Drop the columns no series has a point in (a key logged every 100 steps would otherwise
    # draw as thin stripes): Plotly widens each remaining cell to its neighbours.
    used = sorted({c for row in z for c, v in enumerate(row) if v is not None} | {c for _, c, _ in bad})
    index = {c: i for i, c in enumerate(used)}
    z = [[row[c] for c in used] for row in z]
    bad = [(r, index[c], k) for r, c, k in bad]
    return Grid([ser.key for ser in series], [lo + c * width for c in used], width, z, bad)


def layer_heatmap(series: list[Series], *, prefix: str, title: str, columns: int = 300) -> go.Figure:
    """One row per layer (the key without ``prefix``), colour = log10 of the cell's maximum."""
    grid = step_grid(series, columns)
    names = [escape(r.removeprefix(prefix)) for r in grid.rows]  # Plotly renders tags in labels
    z = [[_log10(v) for v in row] for row in grid.z]
    fig = go.Figure(
        go.Heatmap(
            x=grid.columns,
            y=names,
            z=z,
            customdata=[[v for v in row] for row in grid.z],
            colorscale="Viridis",
            colorbar={"title": "log10"},
            hovertemplate="%{y}<br>steps %{x}+<br>max %{customdata:.4g}<extra></extra>",
            hoverongaps=False,
        )
    )
    if grid.nonfinite:
        fig.add_trace(
            go.Scatter(
                x=[grid.columns[c] for _, c, _ in grid.nonfinite],
                y=[names[r] for r, _, _ in grid.nonfinite],
                mode="markers",
                marker={"symbol": "x", "size": 10, "color": NONFINITE_COLOR, "line": {"width": 2}},
                customdata=[k for _, _, k in grid.nonfinite],
                hovertemplate="%{y}: %{customdata} in steps %{x}+<extra></extra>",
                name="NaN/Inf",
                showlegend=False,
            )
        )
    fig.update_layout(
        title=f"{title}<br><sup>colour: the largest value in each cell of {grid.width:,} step(s); x: NaN/Inf</sup>",
        xaxis_title="step",
        height=max(320, 22 * len(names) + 140),
        margin={"l": 220, "r": 20, "t": 50, "b": 40},
        template="plotly_white",
        yaxis={"autorange": "reversed"},  # model order, top to bottom
        uirevision=title,  # a refresh keeps the user's zoom
    )
    return fig


def _log10(v: float | None) -> float | None:
    if v is None:
        return None
    return math.log10(v) if v > 0 else None


@dataclass(frozen=True)
class Regridded:
    """Histograms over time re-binned onto one set of edges, so they share a y axis."""

    steps: list[int]
    edges: list[float]
    counts: list[list[int]]  # [bin][histogram]
    nonfinite: list[int]  # NaN + Inf values per histogram


def regrid(hists: list[Histogram], bins: int = 80) -> Regridded:
    """Each source bin's count goes to the target bin holding its centre: totals are exact."""
    if not hists:
        return Regridded([], [], [], [])
    lo = min(h.edges[0] for h in hists)
    hi = max(h.edges[-1] for h in hists)
    if hi <= lo:
        hi = lo + 1.0
    width = (hi - lo) / bins
    edges = [lo + i * width for i in range(bins + 1)]
    counts = [[0] * len(hists) for _ in range(bins)]
    for j, h in enumerate(hists):
        for i, c in enumerate(h.counts):
            if c:
                centre = (h.edges[i] + h.edges[i + 1]) / 2
                counts[min(bins - 1, max(0, int((centre - lo) / width)))][j] += c
    return Regridded([h.step for h in hists], edges, counts, [h.nan + h.pinf + h.ninf for h in hists])


def distribution_heatmap(hists: list[Histogram], key: str, selected: int | None = None) -> go.Figure:
    """Histograms over time: x step, y value, colour log10(1 + count); a row of x marks
    above the map shows the steps that held NaN/Inf values, with their counts on hover."""
    g = regrid(hists)
    centres = [(a + b) / 2 for a, b in pairwise(g.edges)]
    fig = go.Figure(
        go.Heatmap(
            x=g.steps,
            y=centres,
            z=[[math.log10(1 + c) for c in row] for row in g.counts],
            customdata=g.counts,
            colorscale="Blues",
            colorbar={"title": "log10(1+n)"},
            hovertemplate="step %{x}<br>value %{y:.4g}<br>count %{customdata}<extra></extra>",
        )
    )
    bad = [(s, n) for s, n in zip(g.steps, g.nonfinite, strict=True) if n]
    if bad:
        top = g.edges[-1] if g.edges else 0.0
        fig.add_trace(
            go.Scatter(
                x=[s for s, _ in bad],
                y=[top] * len(bad),
                mode="markers",
                marker={"symbol": "x", "size": 11, "color": NONFINITE_COLOR, "line": {"width": 2}},
                customdata=[n for _, n in bad],
                hovertemplate="step %{x}: %{customdata} NaN/Inf values<extra></extra>",
                showlegend=False,
            )
        )
    if selected is not None:
        fig.add_vline(x=selected, line={"color": "#d62728", "width": 1, "dash": "dash"})
    fig.update_layout(
        title=f"{escape(key)} over time",
        xaxis_title="step",
        yaxis_title="value",
        height=420,
        margin={"l": 60, "r": 20, "t": 50, "b": 40},
        template="plotly_white",
    )
    return fig


def histogram_bars(h: Histogram, key: str) -> go.Figure:
    """One step's histogram; its NaN, +Inf and -Inf counts are in the title, never hidden."""
    centres = [(a + b) / 2 for a, b in pairwise(h.edges)]
    widths = [b - a for a, b in pairwise(h.edges)]
    nonfinite = f"NaN {h.nan:,}, +Inf {h.pinf:,}, -Inf {h.ninf:,}"
    fig = go.Figure(go.Bar(x=centres, y=h.counts, width=widths, marker={"color": "#1f77b4"}))
    fig.update_layout(
        title=f"{escape(key)} at step {h.step:,}: {sum(h.counts):,} finite values; {nonfinite}",
        xaxis_title="value",
        yaxis_title="count",
        height=320,
        bargap=0,
        margin={"l": 60, "r": 20, "t": 50, "b": 40},
        template="plotly_white",
        title_font_color=NONFINITE_COLOR if h.nan + h.pinf + h.ninf else None,
    )
    return fig
