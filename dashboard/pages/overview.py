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

from trimtab.dashboard import figures, markers
from trimtab.dashboard.client import ApiClient, ApiError, Series
from trimtab.dashboard.common import client, error_box, not_found, run_id_of, run_tabs
from trimtab.dashboard.live import extension, has_nonfinite
from trimtab.protocol import EVENT_NONFINITE

TICK_MS = 1000
VIEW_POINTS = 2000  # per series: what a chart a few thousand pixels wide can show
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
        series = [api.scalars(run_id, k, start_step=start, end_step=end, max_points=VIEW_POINTS) for k in keys]
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
        """New points appended to the figure as it is; a redraw asked for when markers change."""
        run_id = int(state["run_id"])
        api = client()
        try:
            run = api.run(run_id)
            if "rev" not in state:  # the first drawing is on its way, or failed: ask again later
                return _redraw_once(seen or {}, "first", run)
            if not seen or seen.get("rev") != state["rev"]:  # a new figure: start from what it holds
                kept: dict[str, Any] = {k: seen[k] for k in ("asked", "asked_at") if seen and k in seen}
                seen = {**kept, "rev": state["rev"], "last": state["last"], "appended": 0}
            sig = fetch_markers(api, run_id)[1]
            if sig != state["sig"]:
                return _redraw_once(seen, sig, run)
            shown = sorted(k for _, keys, _ in choose_panels(api.keys(run_id)) for k in keys)
            if shown != sorted(state["traces"]):  # a chart's first points (e.g. opened before them)
                return _redraw_once(seen, f"{sig}|keys:{','.join(shown)}", run)
            if state.get("range") or run["last_step"] is None:
                return no_update, no_update, header(run), no_update
            if seen.get("appended", 0) > VIEW_POINTS:  # the figure outgrew its view: a fresh one
                return _redraw_once(seen, "grown", run)
            new: dict[int, Series] = {}
            last = dict(seen["last"])
            nonfinite = False
            for key, idx in state["traces"].items():
                held = last.get(key)
                if held is not None and held >= run["last_step"]:
                    continue
                s = api.scalars(run_id, key, since_step=held, max_points=CATCH_UP_POINTS)
                nonfinite = nonfinite or has_nonfinite(s)
                if s.steps:
                    new[idx] = s
                    last[key] = s.last_step
        except ApiError as exc:
            return no_update, no_update, error_box(exc), no_update
        ext = extension(new)  # NaN/Inf go in as gaps; the redraw below adds their markers
        appended = seen.get("appended", 0) + max((len(s.steps) for s in new.values()), default=0)
        seen = {**seen, "last": last, "appended": appended}
        if nonfinite or seen.get("nonfinite_pending"):
            _, asked, _, rebuild = _redraw_once(seen, "nonfinite", run)
            # Throttled: ask again later, so the last NaN of a burst still gets its marker.
            seen = {**seen, "nonfinite_pending": True} if rebuild is no_update else {**asked, "nonfinite_pending": 0}
            return ext or no_update, seen, header(run), rebuild
        if ext is None:
            return no_update, no_update, header(run), no_update
        return ext, seen, header(run), no_update


REASK_S = 5.0  # a redraw asked for that has not come (it failed, or was dropped) is asked again


def _redraw_once(seen: dict[str, Any], reason: str, run: dict[str, Any]) -> Any:
    """Ask for a redraw once per reason, and again only after REASK_S: asking while one runs
    would cancel it, and a NaN logged every step must not redraw every second."""
    now = time.time()
    if seen.get("asked") == reason and now - float(seen.get("asked_at", 0)) < REASK_S:
        return no_update, no_update, header(run), no_update
    return no_update, {**seen, "asked": reason, "asked_at": now}, header(run), f"{reason}@{now}"
