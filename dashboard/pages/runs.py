"""``/``: every run at a glance: project, status with a live dot, last step, last loss, open alerts."""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from datetime import datetime
from typing import Any

from dash import Dash, Input, Output, dcc, html

from trimtab.dashboard.client import ApiClient, ApiError
from trimtab.dashboard.common import client, error_box

REFRESH_MS = 2000
LIVE_WITHIN_S = 15.0  # a running run heard from this recently gets the live dot
LOSS_LOOKBACK = 200  # steps before the last one searched for the last loss


def layout(**_: Any) -> html.Div:
    return html.Div(
        [
            html.H2("Runs"),
            html.Div(id="runs-table"),
            dcc.Interval(id="runs-tick", interval=REFRESH_MS),
        ],
        className="page",
    )


def register(app: Dash) -> None:
    @app.callback(Output("runs-table", "children"), Input("runs-tick", "n_intervals"))
    def refresh(_: int | None) -> Any:
        api = client()
        try:
            runs = api.runs(limit=100)
            firing = Counter(a["run_id"] for a in api.alerts(status="firing", limit=1000))
            rows = [run_row(r, last_loss(api, r), firing.get(r["id"], 0)) for r in runs]
        except ApiError as exc:
            return error_box(exc)
        if not rows:
            return html.P(
                ["No runs yet. Stream one with ", html.Code("trimtab.init(project=...)"), "; see the README."],
                id="runs-empty",
            )
        head = ["Project", "Run", "Status", "Last step", "Last loss", "Open alerts", "Started", "Host"]
        return html.Table([html.Thead(html.Tr([html.Th(h) for h in head])), html.Tbody(rows)], className="runs")


# (api, run, last step) -> its last loss: a run whose last step has not moved since the
# previous refresh (finished, stale, or between two batches) costs no request.
_LAST_LOSS: OrderedDict[tuple[str, int, int], float | None] = OrderedDict()
LOSS_CACHE_SIZE = 2000


def last_loss(api: ApiClient, run: dict[str, Any]) -> float | None:
    if run.get("last_step") is None:
        return None
    key = (api.base_url, int(run["id"]), int(run["last_step"]))
    if key in _LAST_LOSS:
        return _LAST_LOSS[key]
    loss = _fetch_last_loss(api, run)
    _LAST_LOSS[key] = loss
    if len(_LAST_LOSS) > LOSS_CACHE_SIZE:
        _LAST_LOSS.popitem(last=False)
    return loss


def _fetch_last_loss(api: ApiClient, run: dict[str, Any]) -> float | None:
    try:
        s = api.scalars(run["id"], "loss", start_step=max(0, run["last_step"] - LOSS_LOOKBACK), max_points=500)
    except ApiError as exc:
        if exc.code == "key_not_found":
            return None
        raise
    return s.values[-1] if s.values else None


def run_row(run: dict[str, Any], loss: float | None, open_alerts: int) -> html.Tr:
    live = run["status"] == "running" and time.time() - _ts(run["last_seen_at"]) < LIVE_WITHIN_S
    dot = html.Span(className="dot live" if live else f"dot {run['status']}", title="live" if live else run["status"])
    return html.Tr(
        [
            html.Td(run["project"]),
            html.Td(dcc.Link(run["name"] or run["uid"][:12], href=f"/runs/{run['id']}", className="run-link")),
            html.Td([dot, " ", run["status"]], className="status"),
            html.Td(f"{run['last_step']:,}" if run["last_step"] is not None else "-"),
            html.Td(_number(loss), className="bad" if loss is not None and not math.isfinite(loss) else None),
            html.Td(
                dcc.Link(str(open_alerts), href=f"/runs/{run['id']}/events") if open_alerts else "0",
                className="bad" if open_alerts else None,
            ),
            html.Td(run["created_at"][:19].replace("T", " ")),
            html.Td(run["host"]),
        ],
        id=f"run-row-{run['id']}",
    )


def _number(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()
