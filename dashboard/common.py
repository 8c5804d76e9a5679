"""What every page shares: its API client, the run's tab bar, and how errors are shown."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dash import dcc, html

from trimtab.dashboard import session
from trimtab.dashboard.client import ApiClient, ApiError


@dataclass(frozen=True)
class Config:
    api_url: str  # the REST API the dashboard reads: this server, or a remote one
    auth: bool


CONFIG = Config("http://127.0.0.1:8000", auth=False)  # set by create_dash


def configure(config: Config) -> None:
    global CONFIG
    CONFIG = config


def client() -> ApiClient:
    """An API client carrying the session's token; call inside a request (callback or layout)."""
    return ApiClient(CONFIG.api_url, session.token())


def can_control() -> bool:
    return session.can("control", CONFIG.auth)


def error_box(exc: ApiError) -> html.Div:
    if exc.status == 401:
        return html.Div(
            ["Your session is no longer valid (", exc.message, "). ", html.A("Log in again", href="/login")],
            className="error",
        )
    return html.Div(f"{exc.code}: {exc.message}", className="error")


TABS = (
    ("Overview", ""),
    ("Layers", "/layers"),
    ("Distributions", "/distributions"),
    ("Events & alerts", "/events"),
    ("Control", "/control"),
)


def run_tabs(run_id: int, active: str) -> html.Nav:
    links = []
    for label, suffix in TABS:
        if suffix == "/control" and not can_control():
            continue  # no control scope: the panel is not offered at all
        cls = "tt-tab active" if suffix == active else "tt-tab"
        links.append(dcc.Link(label, href=f"/runs/{run_id}{suffix}", className=cls, id=f"tab{suffix or '/'}"))
    return html.Nav(links, className="tt-tabs")


def run_id_of(value: Any) -> int | None:
    try:
        run_id = int(value)
    except (TypeError, ValueError):
        return None
    return run_id if run_id > 0 else None


def run_page(run_id: Any, title: str, tab: str, body: Callable[[int], list[Any]]) -> html.Div:
    """A run's page: its heading, the tab bar with ``tab`` active, then ``body(run id)``."""
    rid = run_id_of(run_id)
    if rid is None:
        return not_found(f"{run_id!r} is not a run id")
    return html.Div([html.H2(f"Run {rid}: {title}"), run_tabs(rid, tab), *body(rid)], className="page")


def not_found(what: str) -> html.Div:
    return html.Div([html.H2("Not found"), html.P(what), dcc.Link("All runs", href="/")], className="page")
