"""``/runs/<id>/control``: send a command to the training loop, after a confirmation, and
watch it go pending -> delivered -> applied at step N (or rejected, with the reason).

Offered only to a session whose token has the ``control`` scope; the API refuses the
others anyway (403), and the panel shows that refusal if it ever comes.
"""

from __future__ import annotations

import json
from typing import Any

from dash import Dash, Input, Output, State, ctx, dcc, html, no_update

from trimtab.dashboard import markers
from trimtab.dashboard.client import ApiError
from trimtab.dashboard.common import can_control, client, error_box, run_page

REFRESH_MS = 1000
ASKS = ("ctl-ask-reduce", "ctl-ask-skip", "ctl-ask-rollback", "ctl-ask-custom")


def layout(run_id: str | None = None, **_: Any) -> html.Div:
    return run_page(run_id, "control", "/control", _body)


def _body(rid: int) -> list[Any]:
    if not can_control():
        denied = "Your token lacks the control scope: commands cannot be sent from this session."
        return [html.P(denied, id="ctl-denied")]
    return [
        html.Div(
            [
                _form("Reduce LR", "ctl-ask-reduce", [_number("ctl-factor", "factor", 0.5, 0.0001, 0.9999)]),
                _form("Skip batches", "ctl-ask-skip", [_number("ctl-skip-n", "batches", 1, 1, 100_000, step=1)]),
                _form(
                    "Roll back",
                    "ctl-ask-rollback",
                    [_number("ctl-rollback-step", "to step (empty: newest snapshot)", None, 0, None, step=1)],
                ),
                _form(
                    "Custom command",
                    "ctl-ask-custom",
                    [
                        dcc.Input(id="ctl-custom-kind", placeholder="kind, e.g. checkpoint", type="text"),
                        dcc.Textarea(id="ctl-custom-args", placeholder='args as JSON, e.g. {"n": 3}', rows=2),
                    ],
                ),
            ],
            className="forms",
        ),
        html.Div(
            [
                html.Span(id="ctl-confirm-text"),
                html.Button("Confirm", id="ctl-confirm", className="danger"),
                html.Button("Cancel", id="ctl-cancel"),
            ],
            id="ctl-confirm-box",
            className="confirm",
            style={"display": "none"},
        ),
        html.Div(id="ctl-message"),
        html.H3("Commands"),
        html.Div(id="ctl-commands"),
        dcc.Store(id="ctl-run", data=rid),
        dcc.Store(id="ctl-pending"),
        dcc.Interval(id="ctl-tick", interval=REFRESH_MS),
    ]


def _form(title: str, button: str, fields: list[Any]) -> html.Div:
    return html.Div([html.H4(title), *fields, html.Button(f"{title}...", id=button)], className="form")


def _number(
    id_: str, label: str, value: float | None, low: float, high: float | None, step: float | str = "any"
) -> html.Label:
    return html.Label([label, dcc.Input(id=id_, type="number", value=value, min=low, max=high, step=step)])


def request_for(
    trigger: str, factor: Any, n: Any, to_step: Any, kind: str | None, args_text: str | None
) -> dict[str, Any]:
    """The command a form asks for; ValueError with a message people can act on otherwise."""
    if trigger == "ctl-ask-reduce":
        if not isinstance(factor, (int, float)) or not 0 < factor < 1:
            raise ValueError("the factor must be a number between 0 and 1 (0.5 halves the LR)")
        return {"kind": "reduce_lr", "args": {"factor": float(factor)}}
    if trigger == "ctl-ask-skip":
        if not isinstance(n, int) or not 1 <= n <= 100_000:
            raise ValueError("the number of batches must be a whole number from 1 to 100000")
        return {"kind": "skip_batches", "args": {"n": n}}
    if trigger == "ctl-ask-rollback":
        if to_step is None or to_step == "":
            return {"kind": "rollback", "args": {}}
        if not isinstance(to_step, int) or to_step < 0:
            raise ValueError("the step must be a whole number >= 0, or empty for the newest snapshot")
        return {"kind": "rollback", "args": {"to_step": to_step}}
    if not kind or not kind.strip():
        raise ValueError("a custom command needs a kind")
    try:
        args = json.loads(args_text) if args_text and args_text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"the args are not valid JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(args, dict):
        raise ValueError('the args must be a JSON object, e.g. {"n": 3}')
    return {"kind": kind.strip(), "args": args}


def describe(request: dict[str, Any]) -> str:
    args = markers.args_text(request["args"])
    return f"{request['kind']}({args})" if args else request["kind"]


def register(app: Dash) -> None:
    @app.callback(
        Output("ctl-pending", "data"),
        Output("ctl-confirm-box", "style"),
        Output("ctl-confirm-text", "children"),
        Output("ctl-message", "children"),
        *(Input(a, "n_clicks") for a in ASKS),
        Input("ctl-confirm", "n_clicks"),
        Input("ctl-cancel", "n_clicks"),
        State("ctl-factor", "value"),
        State("ctl-skip-n", "value"),
        State("ctl-rollback-step", "value"),
        State("ctl-custom-kind", "value"),
        State("ctl-custom-args", "value"),
        State("ctl-pending", "data"),
        State("ctl-run", "data"),
        prevent_initial_call=True,
    )
    def act(*values: Any) -> Any:
        factor, n, to_step, kind, args_text, pending, run_id = values[-7:]
        hidden, shown = {"display": "none"}, {"display": "flex"}
        trigger = ctx.triggered_id
        if trigger == "ctl-cancel":
            return None, hidden, "", html.Span("Cancelled.", className="notes")
        if trigger == "ctl-confirm":
            if not can_control():
                return None, hidden, "", html.Span("This session lacks the control scope.", className="error")
            if not pending:
                return None, hidden, "", no_update
            try:
                sent = client().send_command(run_id, pending["kind"], pending["args"])
            except ApiError as exc:
                return None, hidden, "", error_box(exc)
            return None, hidden, "", html.Span(f"Sent {describe(pending)}: command {sent['id']}.", id="ctl-sent")
        try:
            request = request_for(str(trigger), factor, n, to_step, kind, args_text)
        except ValueError as exc:
            return None, hidden, "", html.Span(str(exc), className="error", id="ctl-invalid")
        return request, shown, f"Send {describe(request)} to run {run_id}?", ""

    @app.callback(Output("ctl-commands", "children"), Input("ctl-tick", "n_intervals"), State("ctl-run", "data"))
    def commands(_: int | None, run_id: int) -> Any:
        try:
            rows = client().commands(run_id, limit=50)
        except ApiError as exc:
            return error_box(exc)
        if not rows:
            return html.P("No commands sent to this run yet.", className="notes")
        head = ["sent", "kind", "args", "by", "status"]
        body = [
            html.Tr(
                [
                    html.Td(c["created_at"][11:19]),
                    html.Td(c["kind"]),
                    html.Td(markers.args_text(c["args"])),
                    html.Td(f"{c['created_by']} ({c['source']})"),
                    html.Td(markers.status_text(c), className=f"cmd-{c['status']}"),
                ],
                id=f"cmd-{c['id']}",
            )
            for c in rows
        ]
        return html.Table([html.Thead(html.Tr([html.Th(h) for h in head])), html.Tbody(body)], id="ctl-table")
