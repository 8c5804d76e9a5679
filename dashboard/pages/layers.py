"""``/runs/<id>/layers``: per-layer gradient norms and update ratios as heatmaps over steps."""

from __future__ import annotations

from typing import Any

from dash import Dash, Input, Output, State, dcc, html

from trimtab.dashboard.client import ApiError
from trimtab.dashboard.common import client, error_box, run_page
from trimtab.dashboard.heatmaps import layer_heatmap

REFRESH_MS = 5000
MAX_LAYERS = 120  # rows per heatmap; a bigger model shows its first ones and says so
POINTS_PER_LAYER = 600
SKIP = {"grad_norm/total", "grad_norm/depth_ratio"}
VIEWS = (
    ("grad_norm/", "Gradient norm per parameter (before clipping)"),
    ("update_ratio/", "Update ratio |ΔW|/|W| per parameter (about 1e-3 is healthy)"),
)


def layout(run_id: str | None = None, **_: Any) -> html.Div:
    return run_page(
        run_id,
        "layers",
        "/layers",
        lambda rid: [
            html.Div(id="layers-body"),
            dcc.Store(id="layers-run", data=rid),
            dcc.Interval(id="layers-tick", interval=REFRESH_MS),
        ],
    )


def layer_keys(keys: list[dict[str, Any]], prefix: str) -> list[str]:
    """The run's per-parameter keys under ``prefix``, in the order the API lists them."""
    return [k["key"] for k in keys if k["kind"] == "scalar" and k["key"].startswith(prefix) and k["key"] not in SKIP]


def register(app: Dash) -> None:
    @app.callback(Output("layers-body", "children"), Input("layers-tick", "n_intervals"), State("layers-run", "data"))
    def refresh(_: int | None, run_id: int) -> Any:
        api = client()
        try:
            keys = api.keys(run_id)
            body: list[Any] = []
            for prefix, title in VIEWS:
                names = layer_keys(keys, prefix)
                if not names:
                    body.append(html.P(f"No {prefix}* series in this run.", className="notes"))
                    continue
                if len(names) > MAX_LAYERS:
                    note = f"Showing the first {MAX_LAYERS} of {len(names)} parameters."
                    body.append(html.P(note, className="notes"))
                series = [api.scalars(run_id, k, max_points=POINTS_PER_LAYER) for k in names[:MAX_LAYERS]]
                body.append(
                    dcc.Graph(
                        figure=layer_heatmap(series, prefix=prefix, title=title),
                        id=f"layers-{prefix.rstrip('/')}",
                        config={"displaylogo": False},
                    )
                )
            return body
        except ApiError as exc:
            return error_box(exc)
