"""``/runs/<id>``: loss, learning rate, gradient norm and throughput on one step axis, live.

Every second the page asks the API only for points after the last step it holds and
appends them with ``extendData`` (no figure redraw). The whole figure is rebuilt only when
the markers change (a new alert, command or NaN event) or the user zooms; a zoom refetches
the visible step range, which comes back at full resolution once it is narrow enough.
"""

from __future__ import annotations

import time
from typing import Any

from dash import Dash, Input, Output, State, dcc, html, no_update

from trimtab.dashboard import figures, live, markers
from trimtab.dashboard.client import ApiClient, ApiError, Series
from trimtab.dashboard.common import client, error_box, not_found, run_id_of, run_tabs
from trimtab.protocol import EVENT_NONFINITE

TICK_MS = 1000
CATCH_UP_POINTS = 5000  # per series per tick when the page fell behind


def layout(run_id: str | None = None, **_: Any) -> html.Div:
    rid = run_id_of(run_id)
    if rid is None:
        return not_found(f"{run_id!r} is not a run id")
    return html.Div(
        [
            html.Div(id="ov-header", className="run-header"),
            run_tabs(rid, ""),
            html.Div(id="ov-notes", className="notes"),
            dcc.Graph(id="ov-graph", config={"displaylogo": False, "scrollZoom": False}),
            dcc.Store(id="ov-state", data={"run_id": rid}),  # what the figure holds (redraw writes it)
            dcc.Store(id="ov-seen"),  # what the ticks appended since (tick writes it)
            dcc.Store(id="ov-rebuild"),  # set by a tick to ask for a redraw
            dcc.Store(id="ov-load", data=rid),
            dcc.Store(id="ov-zoom"),  # the step range the user zoomed to (set in the browser)
            dcc.Interval(id="ov-tick", interval=TICK_MS),
        ],
        className="page",
    )


def choose_panels(keys: list[dict[str, Any]]) -> list[tuple[str, list[str], bool]]:
    """(title, keys, log y) for the charts this run has data for, in a fixed order."""
    names = {k["key"] for k in keys if k["kind"] == "scalar"}
    panels: list[tuple[str, list[str], bool]] = []
    if "loss" in names:
        panels.append(("loss", ["loss"], False))
    lrs = sorted(n for n in names if n.startswith("lr/"))
    if lrs:
        panels.append(("learning rate", lrs, False))
    if "grad_norm/total" in names:
        panels.append(("gradient norm (total, before clipping)", ["grad_norm/total"], True))
    for key, title in (
        ("perf/tokens_per_s", "throughput (tokens/s)"),
        ("perf/samples_per_s", "throughput (samples/s)"),
        ("perf/step_time_s", "step time (s)"),
    ):
        if key in names:
            panels.append((title, [key], False))
            break
    if "loss_scale" in names:
        panels.append(("loss scale", ["loss_scale"], True))
    return panels


def header(run: dict[str, Any]) -> list[Any]:
    live = run["status"] == "running"
    return [
        html.H2([html.Span(className="dot live" if live else f"dot {run['status']}"), " ", run["name"] or run["uid"]]),
        html.Span(
            f"project {run['project']} · {run['status']} · step {_step(run['last_step'])}"
            f" · {run['host']} · world size {run['world_size']}",
            className="meta",
            id="ov-meta",
        ),
    ]


def _step(step: int | None) -> str:
    return "-" if step is None else f"{step:,}"


def fetch_markers(api: ApiClient, run_id: int) -> tuple[list[markers.Marker], str]:
    """The run's markers and a signature that changes whenever any of them does."""
    events = api.events(run_id, kind=EVENT_NONFINITE)
    alerts = api.alerts(run_id, limit=200)
    commands = api.commands(run_id, limit=100)
    found = markers.from_events(events) + markers.from_alerts(alerts) + markers.from_commands(commands)
    sig = "|".join(
        [
            ",".join(str(e["id"]) for e in events),
            # Not last_step: a firing alert moves it with every finding, which would redraw each tick.
            ",".join(f"{a['id']}:{a['status']}" for a in alerts),
            ",".join(f"{c['id']}:{c['status']}" for c in commands),
        ]
    )
    return found, sig


def build(api: ApiClient, run_id: int, span: list[int] | None) -> tuple[Any, dict[str, Any], list[Any]]:
    """The whole figure, the page's state (trace of each key, last step held) and notes on resolution."""
    panel_specs = choose_panels(api.keys(run_id))
    start, end = (span[0], span[1]) if span else (None, None)
    panels = []
    for title, keys, log_y in panel_specs:
        series = [api.scalars(run_id, k, start_step=start, end_step=end, max_points=live.VIEW_POINTS) for k in keys]
        panels.append(figures.Panel(title, series, log_y))
    found, sig = fetch_markers(api, run_id)
    fig = figures.overview_figure(panels, found, uirevision=f"run-{run_id}")
    traces: dict[str, int] = {}
    last: dict[str, int | None] = {}
    for p in panels:
        for s, idx in zip(p.series, p.traces, strict=True):
            traces[s.key] = idx
            last[s.key] = s.last_step
    state = {"run_id": run_id, "traces": traces, "last": last, "range": span, "sig": sig}
    notes: list[Any] = [html.Div(figures.describe(s)) for p in panels for s in p.series if s.downsampled]
    if span:
        notes.append(
            html.Div(
                f"Showing steps {span[0]:,}-{span[1]:,}; live updates paused while zoomed. "
                "Double-click the chart to follow the run again.",
                id="ov-zoom-note",
            )
        )
    if not panels:
        notes.append(html.Div("This run has no loss, LR or gradient-norm series yet.", id="ov-empty"))
    return fig, state, notes


# relayoutData -> the step range shown ([first, last], null for the whole run), or no_update
# when the event is not an x-axis zoom. Any of the shared x axes may report it.
ZOOM_JS = """
function(relayout, current) {
    const skip = window.dash_clientside.no_update;
    if (!relayout) { return skip; }
    let lo = null, hi = null;
    for (const [k, v] of Object.entries(relayout)) {
        if (/^xaxis[0-9]*[.]autorange$/.test(k) && v) { return current ? null : skip; }
        const end = k.match(/^xaxis[0-9]*[.]range\\[([01])\\]$/);
        if (end) { if (end[1] === "0") { lo = v; } else { hi = v; } }
        if (/^xaxis[0-9]*[.]range$/.test(k) && Array.isArray(v)) { lo = v[0]; hi = v[1]; }
    }
    if (lo === null || hi === null) { return skip; }
    const span = [Math.floor(Math.min(lo, hi)), Math.ceil(Math.max(lo, hi))];
    if (current && current[0] === span[0] && current[1] === span[1]) { return skip; }
    return span;
}
"""


def register(app: Dash) -> None:
    # Two callbacks, so a slow redraw is never cancelled by the next tick (Dash drops the
    # answer of a request that a newer trigger of the same callback superseded).
    # The zoom goes to a store in the browser, at once: a server callback reading
    # relayoutData would be cancelled by the next relayout event (Plotly sends an autosize
    # one after a redraw), and the zoom lost.
    app.clientside_callback(  # type: ignore[no-untyped-call]
        ZOOM_JS, Output("ov-zoom", "data"), Input("ov-graph", "relayoutData"), State("ov-zoom", "data")
    )

    @app.callback(
        Output("ov-graph", "figure"),
        Output("ov-state", "data"),
        Output("ov-notes", "children"),
        Input("ov-load", "data"),  # no callback writes it: the first drawing on page load
        Input("ov-rebuild", "data"),
        Input("ov-zoom", "data"),
        State("ov-state", "data"),
    )
    def redraw(_: Any, __: Any, zoom: list[int] | None, state: dict[str, Any]) -> Any:
        """The whole figure: on page load, when the markers change, and when the user zooms."""
        try:
            fig, new_state, notes = build(client(), int(state["run_id"]), zoom)
        except ApiError as exc:
            return no_update, no_update, error_box(exc)
        return fig, {**new_state, "rev": int(state.get("rev", 0)) + 1}, notes

    @app.callback(
        Output("ov-graph", "extendData"),
        Output("ov-seen", "data"),
        Output("ov-header", "children"),
        Output("ov-rebuild", "data"),
        Input("ov-tick", "n_intervals"),
        State("ov-state", "data"),
        State("ov-seen", "data"),
    )
    def tick(_: int | None, state: dict[str, Any], seen: dict[str, Any] | None) -> Any:
        """New points appended to the figure as it is; a redraw asked for when markers change
        (the decisions are ``live.decide`` and ``live.appended``)."""
        run_id = int(state["run_id"])
        api = client()
        try:
            run = api.run(run_id)
            sig = fetch_markers(api, run_id)[1] if "rev" in state else ""
            shown = [k for _, keys, _ in choose_panels(api.keys(run_id)) for k in keys] if "rev" in state else []
            step = live.decide(state, seen, run["last_step"], sig, shown, time.time())
            if isinstance(step, live.Fetch):
                new: dict[int, Series] = {}
                for key, (idx, held) in step.since.items():
                    s = api.scalars(run_id, key, since_step=held, max_points=CATCH_UP_POINTS)
                    if s.steps:
                        new[idx] = s
                step = live.appended(step.seen, new, time.time())
        except ApiError as exc:
            return no_update, no_update, error_box(exc), no_update
        return (
            no_update if step.extend is None else step.extend,
            no_update if step.seen is None else step.seen,
            header(run),
            no_update if step.rebuild is None else step.rebuild,
        )
