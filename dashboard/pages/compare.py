"""``/compare``: one key of several runs overlaid on one step axis (``?runs=1,2&key=loss``)."""

from __future__ import annotations

from typing import Any

from dash import Dash, Input, Output, State, dcc, html, no_update

from trimtab.dashboard.client import ApiError, Series
from trimtab.dashboard.common import client, error_box, run_id_of
from trimtab.dashboard.figures import compare_figure

VIEW_POINTS = 2000
REFRESH_MS = 5000


def layout(runs: str | None = None, key: str | None = None, **_: Any) -> html.Div:
    chosen = [r for r in (run_id_of(x) for x in (runs or "").split(",")) if r is not None]
    try:  # the chosen runs need their options at once, or the dropdown drops them
        run_options = _run_options(client().runs(limit=200))
    except ApiError as exc:
        return html.Div([html.H2("Compare runs"), error_box(exc)], className="page")
    return html.Div(
        [
            html.H2("Compare runs"),
            html.Div(
                [
                    dcc.Dropdown(id="cmp-runs", multi=True, value=chosen, options=run_options, placeholder="runs"),
                    dcc.Dropdown(
                        id="cmp-key", value=key or "loss", options=[key or "loss"], clearable=False, placeholder="key"
                    ),
                    dcc.Checklist(id="cmp-log", options=[{"label": " log y", "value": "log"}], value=[]),
                ],
                className="compare-controls",
            ),
            html.Div(id="cmp-error"),
            dcc.Graph(id="cmp-graph", config={"displaylogo": False}),
            dcc.Interval(id="cmp-tick", interval=REFRESH_MS),
        ],
        className="page",
    )


def _run_options(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"label": f"{r['id']}: {r['project']} / {r['name'] or r['uid'][:12]}", "value": r["id"]} for r in runs]


def register(app: Dash) -> None:
    @app.callback(
        Output("cmp-runs", "options"),
        Output("cmp-key", "options"),
        Input("cmp-tick", "n_intervals"),
        Input("cmp-runs", "value"),
    )
    def options(_: int | None, chosen: list[int] | None) -> Any:
        api = client()
        try:
            runs = api.runs(limit=200)
            keys: set[str] = set()
            for run_id in chosen or []:
                keys.update(k["key"] for k in api.keys(run_id) if k["kind"] == "scalar")
        except ApiError:
            return no_update, no_update
        return _run_options(runs), sorted(keys or {"loss"})

    @app.callback(
        Output("cmp-graph", "figure"),
        Output("cmp-error", "children"),
        Input("cmp-runs", "value"),
        Input("cmp-key", "value"),
        Input("cmp-log", "value"),
        Input("cmp-tick", "n_intervals"),
        State("cmp-runs", "options"),
    )
    def draw(chosen: list[int] | None, key: str | None, log: list[str], _: int | None, opts: Any) -> Any:
        if not chosen or not key:
            return compare_figure([], key or ""), html.P("Choose runs and a key.", className="notes")
        labels = {o["value"]: o["label"] for o in opts or []}
        api = client()
        series: list[tuple[str, Series]] = []
        missing = []
        for run_id in chosen:
            try:
                series.append((labels.get(run_id, str(run_id)), api.scalars(run_id, key, max_points=VIEW_POINTS)))
            except ApiError as exc:
                if exc.code != "key_not_found":
                    return no_update, error_box(exc)
                missing.append(str(run_id))
        note = html.P(f"No {key} in run(s) {', '.join(missing)}.", className="notes") if missing else None
        return compare_figure(series, key, log_y="log" in (log or [])), note
