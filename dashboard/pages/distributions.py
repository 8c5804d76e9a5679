"""``/runs/<id>/distributions``: weight, gradient and activation histograms over time, with a
step slider for one step's histogram and its NaN/Inf counts."""

from __future__ import annotations

from typing import Any

from dash import Dash, Input, Output, State, ctx, dcc, html, no_update

from trimtab.dashboard.client import ApiError
from trimtab.dashboard.common import client, error_box, run_page
from trimtab.dashboard.heatmaps import distribution_heatmap, histogram_bars

REFRESH_MS = 5000
HISTOGRAMS = 200  # the newest this many of a key
GROUPS = (("weights/", "weights"), ("grads/", "gradients"), ("acts/", "activations"))


def layout(run_id: str | None = None, **_: Any) -> html.Div:
    return run_page(run_id, "distributions", "/distributions", _body)


def _body(rid: int) -> list[Any]:
    return [
        dcc.Dropdown(id="dist-key", placeholder="a histogram key", clearable=False),
        html.Div(id="dist-error"),
        dcc.Graph(id="dist-heatmap", config={"displaylogo": False}),
        html.Label("step", htmlFor="dist-step"),
        dcc.Slider(id="dist-step", min=0, max=0, step=None, value=None, tooltip={"always_visible": True}),
        dcc.Graph(id="dist-bars", config={"displaylogo": False}),
        dcc.Store(id="dist-run", data=rid),
        dcc.Interval(id="dist-tick", interval=REFRESH_MS),
    ]


def key_options(keys: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Histogram keys grouped weights, gradients, activations, labelled by group."""
    names = [k["key"] for k in keys if k["kind"] == "histogram"]
    options = []
    for prefix, label in GROUPS:
        options += [{"label": f"{label}: {n.removeprefix(prefix)}", "value": n} for n in names if n.startswith(prefix)]
    known = {o["value"] for o in options}
    options += [{"label": n, "value": n} for n in names if n not in known]
    return options


def register(app: Dash) -> None:
    @app.callback(
        Output("dist-key", "options"),
        Output("dist-key", "value"),
        Input("dist-tick", "n_intervals"),
        State("dist-run", "data"),
        State("dist-key", "value"),
    )
    def keys(_: int | None, run_id: int, current: str | None) -> Any:
        try:
            options = key_options(client().keys(run_id))
        except ApiError:
            return no_update, no_update
        return options, current or (options[0]["value"] if options else None)

    @app.callback(
        Output("dist-heatmap", "figure"),
        Output("dist-bars", "figure"),
        Output("dist-step", "min"),
        Output("dist-step", "max"),
        Output("dist-step", "marks"),
        Output("dist-step", "value"),
        Output("dist-error", "children"),
        Input("dist-key", "value"),
        Input("dist-step", "value"),
        Input("dist-tick", "n_intervals"),
        State("dist-run", "data"),
    )
    def draw(key: str | None, step: int | None, _: int | None, run_id: int) -> Any:
        if not key:
            return no_update, no_update, no_update, no_update, no_update, no_update, html.P("No histograms yet.")
        try:
            hists = client().histograms(run_id, key, limit=HISTOGRAMS)
        except ApiError as exc:
            return no_update, no_update, no_update, no_update, no_update, no_update, error_box(exc)
        if not hists:
            return no_update, no_update, no_update, no_update, no_update, no_update, html.P("No histograms yet.")
        steps = [h.step for h in hists]
        # A tick keeps the step the user chose; a new key (or no choice yet) shows the newest.
        if step not in steps or ctx.triggered_id == "dist-key":
            step = steps[-1]
        chosen = hists[steps.index(step)]
        every = max(1, len(steps) // 8)
        # Every histogram's step is a stop on the slider; only some carry a label.
        marks = {str(s): (f"{s:,}" if i % every == 0 else "") for i, s in enumerate(steps)}
        return (
            distribution_heatmap(hists, key, selected=step),
            histogram_bars(chosen, key),
            steps[0],
            steps[-1],
            marks,
            step,
            None,
        )
