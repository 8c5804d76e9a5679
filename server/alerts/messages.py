"""What a sink receives: the signed webhook request and the Slack message, built from an alert payload.

Pure functions of their inputs (no I/O), so the formats are tested without a network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from trimtab import webhooks
from trimtab.jsonsafe import dumps, float_to_json
from trimtab.version import __version__

USER_AGENT = f"trimtab/{__version__}"
SLACK_TEXT_LIMIT = 2900  # Slack truncates a section's text at 3000 characters
SEVERITY_ICON = {"critical": ":rotating_light:", "warning": ":warning:"}


@dataclass(frozen=True)
class Request:
    body: bytes
    headers: dict[str, str]


def webhook_body(event: str, delivery_id: int | None, alert: dict[str, Any]) -> bytes:
    """The JSON body of a generic webhook: ``{"event", "delivery_id", "alert"}``."""
    return dumps({"event": event, "delivery_id": delivery_id, "alert": alert})


def webhook_request(secret: str, body: bytes, delivery: str, timestamp: int) -> Request:
    """Headers that let the receiver check origin (HMAC), freshness (timestamp) and dedupe (delivery id)."""
    return Request(
        body=body,
        headers={
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            webhooks.TIMESTAMP_HEADER: str(timestamp),
            webhooks.SIGNATURE_HEADER: webhooks.sign(secret, timestamp, body),
            webhooks.DELIVERY_HEADER: delivery,
        },
    )


def slack_request(event: str, alert: dict[str, Any]) -> Request:
    return Request(
        body=dumps(slack_message(event, alert)),
        headers={"Content-Type": "application/json", "User-Agent": USER_AGENT},
    )


def format_number(value: Any) -> str:
    """Numbers for people: NaN and Inf by name, 4 significant digits, "-" when absent."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value  # already "NaN" / "Infinity" / "-Infinity" from the API encoding
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(float_to_json(value))
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _escape(text: Any) -> str:
    """Slack mrkdwn treats &, < and > as control characters."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int = SLACK_TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _headline(event: str, alert: dict[str, Any]) -> str:
    severity = str(alert.get("severity") or "warning")
    rule = alert.get("rule", "?")
    if event == "resolved":
        return f":white_check_mark: RESOLVED {rule}"
    if event == "test":
        return ":wave: trimtab test message"
    verb = "ESCALATED to " if event == "escalated" else ""
    return f"{SEVERITY_ICON.get(severity, ':warning:')} {verb}{severity.upper()} {rule}"


def _run_label(alert: dict[str, Any]) -> str:
    name = alert.get("run_name") or alert.get("run_uid") or "?"
    rank = alert.get("rank")
    label = f"{name} (#{alert.get('run_id', '?')})"
    return f"{label} rank {rank}" if rank else label


def slack_message(event: str, alert: dict[str, Any]) -> dict[str, Any]:
    """An incoming-webhook message: ``text`` for notifications and old clients, ``blocks`` to read."""
    headline = _headline(event, alert)
    project = alert.get("project", "?")
    value, step = format_number(alert.get("value")), format_number(alert.get("last_step"))
    where = f"{alert.get('key', '?')} = {value} at step {step}"
    text = f"{headline}: {project} / {_run_label(alert)}: {where}"
    if event == "resolved":
        text = f"{headline}: {project} / {_run_label(alert)}: {alert.get('key', '?')} is back to normal"
    fields = [
        ("Project", project),
        ("Run", _run_label(alert)),
        ("Rule", f"{alert.get('rule', '?')} ({alert.get('detector', '?')})"),
        ("Key", alert.get("key", "?")),
        ("Step", format_number(alert.get("last_step"))),
        ("Value", format_number(alert.get("value"))),
        ("Baseline", format_number(alert.get("baseline"))),
        ("Severity", alert.get("severity", "?")),
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": _clip(f"*{_escape(headline)}*")}},
    ]
    if alert.get("message"):
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _clip(_escape(alert["message"]))}})
    blocks.append(
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": _clip(f"*{name}*\n{_escape(shown)}", 1900)} for name, shown in fields
            ],
        }
    )
    if alert.get("remedy") and event != "resolved":
        remedy = _clip(f":bulb: *What to try:* {_escape(alert['remedy'])}")
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": remedy}]})
    if alert.get("url"):
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open run"},
                        "url": str(alert["url"])[:3000],
                    }
                ],
            }
        )
    return {"text": _clip(_escape(text)), "blocks": blocks}


def sample_alert(sink_id: int, public_url: str | None) -> dict[str, Any]:
    """A made-up alert for ``POST /sinks/{id}/test``, shaped like a real one (``alert_store.alert_payload``)."""
    return {
        "id": 0,
        "project": "trimtab-test",
        "run_id": 0,
        "run_name": "test message",
        "run_uid": "test",
        "rank": 0,
        "rule": "test",
        "key": "loss",
        "detector": "nonfinite",
        "severity": "warning",
        "status": "firing",
        "message": f"This is a test message for trimtab sink {sink_id}: if you can read it, alerts will reach you.",
        "remedy": "Nothing to do: this is only a test.",
        "value": "NaN",
        "baseline": 2.5,
        "first_step": 0,
        "last_step": 0,
        "count": 1,
        "fired_at": None,
        "updated_at": None,
        "resolved_at": None,
        "resolve_reason": None,
        "notified": True,
        "data": {},
        "url": public_url,
    }
