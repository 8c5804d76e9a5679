"""``/runs/<id>/events``: NaN/Inf events with the offending module, alerts and commands, on
one timeline and in tables."""

from __future__ import annotations

from typing import Any

from dash import Dash, Input, Output, State, dcc, html

from trimtab.dashboard import markers
from trimtab.dashboard.client import ApiError
from trimtab.dashboard.common import client, error_box, run_page
from trimtab.dashboard.figures import timeline_figure
from trimtab.protocol import EVENT_NONFINITE

REFRESH_MS = 2000


def layout(run_id: str | None = None, **_: Any) -> html.Div:
    return run_page(
        run_id,
        "events and alerts",
        "/events",
        lambda rid: [
            dcc.Graph(id="events-timeline", config={"displaylogo": False}),
            html.Div(id="events-tables"),
            dcc.Store(id="events-run", data=rid),
            dcc.Interval(id="events-tick", interval=REFRESH_MS),
        ],
    )


def table(head: list[str], rows: list[list[Any]], table_id: str, empty: str) -> html.P | html.Table:
    if not rows:
        return html.P(empty, className="notes", id=f"{table_id}-empty")
    return html.Table(
        [html.Thead(html.Tr([html.Th(h) for h in head])), html.Tbody([html.Tr([html.Td(c) for c in r]) for r in rows])],
        id=table_id,
        className="events",
    )


def nonfinite_rows(events: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for e in events:
        d = e.get("data") or {}
        rows.append(
            [
                e.get("step"),
                e.get("rank", 0),
                d.get("source", "?"),
                html.B(d.get("module") or "-"),  # the replay's finding; none when it found none
                d.get("param") or "-",
                str(d.get("loss", "-")),
            ]
        )
    return rows


def register(app: Dash) -> None:
    @app.callback(
        Output("events-timeline", "figure"),
        Output("events-tables", "children"),
        Input("events-tick", "n_intervals"),
        State("events-run", "data"),
    )
    def refresh(_: int | None, run_id: int) -> Any:
        api = client()
        try:
            events = api.events(run_id, kind=EVENT_NONFINITE)
            alerts = api.alerts(run_id, limit=200)
            commands = api.commands(run_id, limit=100)
        except ApiError as exc:
            return timeline_figure([]), error_box(exc)
        found = markers.from_events(events) + markers.from_alerts(alerts) + markers.from_commands(commands)
        alert_rows = [
            [a["first_step"], a["last_step"], html.B(a["rule"]), a["severity"], a["status"], a["message"], a["remedy"]]
            for a in alerts
        ]
        command_rows = [
            [c["created_at"][:19].replace("T", " "), c["kind"], markers.args_text(c["args"]), markers.status_text(c)]
            for c in commands
        ]
        tables = [
            html.H3("NaN/Inf events"),
            table(
                ["step", "rank", "source", "first non-finite module", "parameter", "loss"],
                nonfinite_rows(events),
                "events-nonfinite",
                "No non-finite steps.",
            ),
            html.H3("Alerts"),
            table(
                ["first step", "last step", "rule", "severity", "status", "message", "what to do"],
                alert_rows,
                "events-alerts",
                "No alerts.",
            ),
            html.H3("Commands"),
            table(["sent", "kind", "args", "status"], command_rows, "events-commands", "No commands."),
        ]
        return timeline_figure(found), tables
