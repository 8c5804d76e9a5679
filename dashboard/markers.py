"""What happened at a step, for the charts' marker strip and the events page: NaN/Inf
events, alerts and commands, turned from API rows into one shape."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Any

from trimtab.protocol import EVENT_NONFINITE

NONFINITE = "NaN/Inf"
ALERT = "alerts"
COMMAND = "commands"
ROWS = (NONFINITE, ALERT, COMMAND)  # the strip's rows, bottom to top


@dataclass(frozen=True)
class Marker:
    step: int
    row: str  # one of ROWS
    label: str  # a few words, for tables
    detail: str  # hover text (Plotly's <br> line breaks)
    severity: str  # critical | warning | info


def from_events(events: list[dict[str, Any]]) -> list[Marker]:
    """The non-finite events (one per streak), with where the NaN was born when the agent found it."""
    out = []
    for e in events:
        if e.get("kind") != EVENT_NONFINITE or e.get("step") is None:
            continue
        data = e.get("data") or {}
        lines = [f"<b>non-finite at step {e['step']}</b> (rank {escape(str(e.get('rank', 0)))})"]
        lines += [f"{k}: {escape(str(data[k]))}" for k in PROVENANCE_FIELDS if data.get(k) not in (None, "", [])]
        out.append(Marker(int(e["step"]), NONFINITE, f"non-finite ({where(data)})", "<br>".join(lines), "critical"))
    return out


# The nonfinite event's fields worth showing, most telling first (docs/metrics.md).
PROVENANCE_FIELDS = ("source", "module", "param", "n_nonfinite_params", "loss", "grad_norm_total", "batch_finite")


def where(data: dict[str, Any]) -> str:
    """The offending module or parameter, as precisely as the event says."""
    for k in ("module", "param", "source"):
        if data.get(k):
            return str(data[k])
    return "unknown origin"


def from_alerts(alerts: list[dict[str, Any]]) -> list[Marker]:
    return [
        Marker(
            int(a["first_step"]),
            ALERT,
            f"{a['rule']} ({a['status']})",
            f"<b>{escape(a['rule'])}</b> {escape(str(a['severity']))}, {escape(str(a['status']))}"
            f"<br>{_wrap(escape(a['message']))}"
            f"<br>steps {a['first_step']}-{a['last_step']}",
            a["severity"],
        )
        for a in alerts
    ]


def from_commands(commands: list[dict[str, Any]]) -> list[Marker]:
    """Commands that took effect (at their step), and the ones still waiting (at no step: left out)."""
    out = []
    for c in commands:
        if c.get("step") is None:
            continue
        out.append(
            Marker(
                int(c["step"]),
                COMMAND,
                f"{c['kind']} {args_text(c.get('args') or {})}".strip(),
                f"<b>{escape(c['kind'])}</b> {escape(args_text(c.get('args') or {}))}<br>{escape(status_text(c))}"
                f"<br>by {escape(str(c.get('created_by', '?')))} ({escape(str(c.get('source', 'human')))})",
                "info" if c["status"] == "applied" else "warning",
            )
        )
    return out


def args_text(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in args.items())


def status_text(command: dict[str, Any]) -> str:
    """A command's state in words: pending, delivered, applied at step N, rejected: why, expired."""
    status = command["status"]
    if status == "applied":
        return f"applied at step {command['step']}"
    if status in ("rejected", "expired"):
        detail = command.get("detail") or {}
        reason = detail.get("reason") or detail.get("error") or detail.get("message")
        return f"{status}: {reason}" if reason else str(status)
    return str(status)


def _wrap(text: str, width: int = 80) -> str:
    """Plotly hover boxes do not wrap: break long messages into lines."""
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "<br>".join(lines)
