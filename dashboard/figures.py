"""Line charts on a shared step axis, as pure functions of API data (tested without a browser).

Keys, run names and messages come from training scripts: they are HTML-escaped wherever
Plotly would render its subset of HTML (trace names, hover text, titles, tick labels).

Plotly leaves a gap where a value is NaN and says nothing: here every non-finite point also
gets a marker of its own (an x for NaN, a triangle for ±Inf) on the last finite value
before it, so a NaN is never silently dropped. Alerts, commands and NaN/Inf events sit in
a strip above the charts, on the same step axis, with their details on hover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from trimtab.dashboard.client import Series
from trimtab.dashboard.markers import NONFINITE, ROWS, Marker

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
SEVERITY_COLORS = {"critical": "#d62728", "warning": "#ff9f1c", "info": "#1f77b4"}
NONFINITE_SYMBOLS = {"NaN": "x", "+Inf": "triangle-up", "-Inf": "triangle-down"}
STRIP_HEIGHT = 0.12  # of the figure, for the marker strip
MAX_LINES = 40  # vertical lines for alerts and commands; more would clutter and slow the chart


@dataclass
class Panel:
    """One chart of the overview: a title and the series drawn on it."""

    title: str
    series: list[Series]
    log_y: bool = False
    traces: list[int] = field(default_factory=list)  # filled by the builder: each series' line trace


@dataclass(frozen=True)
class NonFinite:
    steps: list[int]
    y: list[float]
    kinds: list[str]  # NaN | +Inf | -Inf


def nonfinite_points(series: Series) -> NonFinite:
    """Where a series is not finite, placed on the last finite value before it (the first after, at the start)."""
    steps: list[int] = []
    ys: list[float] = []
    kinds: list[str] = []
    last: float | None = None
    pending: list[int] = []  # non-finite points seen before any finite one
    for i, (s, v) in enumerate(zip(series.steps, series.values, strict=True)):
        if math.isfinite(v):
            if last is None:
                ys.extend(v for _ in pending)
            last = v
            continue
        steps.append(s)
        kinds.append("NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf"))
        if last is None:
            pending.append(i)
        else:
            ys.append(last)
    if last is None:
        ys.extend(0.0 for _ in pending)
    return NonFinite(steps, ys, kinds)


def describe(series: Series) -> str:
    """How many points the chart holds of how many: say so whenever the view is not every point."""
    if not series.downsampled:
        return f"{series.key}: every point ({len(series.steps):,})"
    return (
        f"{series.key}: {len(series.steps):,} of {series.total_points:,} points, "
        f"min and max of every {series.bucket_steps:,} steps kept, zoom in for every point"
    )


def overview_figure(panels: list[Panel], markers: list[Marker], *, uirevision: str = "run") -> go.Figure:
    """The run's charts stacked on one step axis under a strip of markers.

    Each series draws a line trace followed by its non-finite marker trace (empty when the
    series is finite), in panel order: ``panel.traces`` records the line traces' indices so
    a live update can extend exactly those traces.
    """
    rows = len(panels) + 1
    chart_h = (1.0 - STRIP_HEIGHT) / max(1, len(panels))
    fig = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.03,
        row_heights=[STRIP_HEIGHT, *([chart_h] * len(panels))],
        subplot_titles=["", *(p.title for p in panels)],
    )
    _strip(fig, markers, row=1)
    n = len(fig.data)  # the strip's traces come first
    for r, panel in enumerate(panels, start=2):
        panel.traces = []
        for i, s in enumerate(panel.series):
            color = COLORS[i % len(COLORS)]
            line = _line(s, escape(s.key), color, escape(s.key))
            line.update(showlegend=len(panel.series) > 1, legendgroup=panel.title)
            fig.add_trace(line, row=r, col=1)
            panel.traces.append(n)
            fig.add_trace(_nonfinite_trace(s, color), row=r, col=1)
            n += 2
        if panel.log_y:
            fig.update_yaxes(type="log", row=r, col=1)
    _lines(fig, markers, rows)
    fig.update_xaxes(title_text="step", row=rows, col=1)
    fig.update_layout(
        height=max(420, 190 * len(panels) + 90),
        margin={"l": 60, "r": 20, "t": 30, "b": 40},
        hovermode="closest",
        uirevision=uirevision,  # keep the user's zoom across live updates
        legend={"orientation": "h", "y": -0.08},
        template="plotly_white",
    )
    return fig


def _line(series: Series, name: str, color: str, hover: str) -> go.Scatter:
    """A series as a line; NaN/Inf points are gaps (their markers are a trace of their own)."""
    return go.Scatter(
        x=series.steps,
        y=series.values,
        mode="lines",
        name=name,
        line={"color": color, "width": 1.3},
        connectgaps=False,
        hovertemplate=f"{hover}<br>step %{{x}}<br>%{{y:.5g}}<extra></extra>",
    )


def _nonfinite_trace(series: Series, color: str) -> go.Scatter:
    nf = nonfinite_points(series)
    return go.Scatter(
        x=nf.steps,
        y=nf.y,
        mode="markers",
        name=f"{escape(series.key)} NaN/Inf",
        marker={
            "symbol": [NONFINITE_SYMBOLS[k] for k in nf.kinds],
            "size": 11,
            "color": SEVERITY_COLORS["critical"],
            "line": {"width": 2, "color": SEVERITY_COLORS["critical"]},
        },
        customdata=nf.kinds,
        hovertemplate=f"{escape(series.key)} = %{{customdata}} at step %{{x}}<extra></extra>",
        showlegend=False,
    )


def strip_traces(markers: list[Marker]) -> list[go.Scatter]:
    """One trace per strip row (always three, so trace indices do not depend on the data)."""
    out = []
    for name in ROWS:
        mine = [m for m in markers if m.row == name]
        out.append(
            go.Scatter(
                x=[m.step for m in mine],
                y=[name] * len(mine),
                mode="markers",
                name=name,
                marker={
                    "symbol": "x" if name == NONFINITE else "diamond",
                    "size": 11,
                    "color": [SEVERITY_COLORS.get(m.severity, "#444") for m in mine],
                },
                hovertext=[m.detail for m in mine],
                hoverinfo="text",
                showlegend=False,
            )
        )
    return out


def _strip(fig: go.Figure, markers: list[Marker], row: int) -> None:
    for t in strip_traces(markers):
        fig.add_trace(t, row=row, col=1)
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=list(ROWS), row=row, col=1, fixedrange=True)


def _lines(fig: go.Figure, markers: list[Marker], rows: int) -> None:
    """Faint vertical lines through every chart at the latest alerts and commands."""
    chosen = sorted((m for m in markers if m.row != "NaN/Inf"), key=lambda m: m.step)[-MAX_LINES:]
    for m in chosen:
        for r in range(2, rows + 1):
            fig.add_vline(
                x=m.step,
                line={"color": SEVERITY_COLORS.get(m.severity, "#444"), "width": 1, "dash": "dot"},
                opacity=0.6,
                row=r,
                col=1,
            )


def compare_figure(series: list[tuple[str, Series]], key: str, log_y: bool = False) -> go.Figure:
    """One key of several runs overlaid on one step axis, each with its NaN/Inf markers."""
    fig = go.Figure()
    for i, (label, s) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        label = escape(label)
        fig.add_trace(_line(s, label, color, f"{label}<br>{escape(key)}"))
        nf = _nonfinite_trace(s, color)
        nf.name = f"{label} NaN/Inf"
        fig.add_trace(nf)
    fig.update_layout(
        title=escape(key),
        xaxis_title="step",
        yaxis_type="log" if log_y else "linear",
        height=520,
        margin={"l": 60, "r": 20, "t": 50, "b": 40},
        template="plotly_white",
        uirevision=key,
    )
    return fig


def timeline_figure(markers: list[Marker]) -> go.Figure:
    """The marker strip on its own, for the events page."""
    fig = go.Figure(strip_traces(markers))
    fig.update_layout(
        height=240,
        xaxis_title="step",
        yaxis={"type": "category", "categoryorder": "array", "categoryarray": list(ROWS)},
        margin={"l": 80, "r": 20, "t": 20, "b": 40},
        template="plotly_white",
        showlegend=False,
    )
    return fig
