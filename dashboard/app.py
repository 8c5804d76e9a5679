"""``create_dash``: the Dash app (a Flask app underneath) that reads only the REST API.

``trimtab server`` mounts it at ``/`` beside the API; ``trimtab dashboard --api-url URL``
serves it on its own against a remote server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dash
from dash import Dash, dcc, html

from trimtab.dashboard import common, session
from trimtab.dashboard.pages import compare, control, distributions, events, layers, overview, runs

ASSETS = Path(__file__).parent / "assets"

# (module, path template, title) of every page; each module has layout() and register(app).
PAGES: tuple[tuple[Any, str, str], ...] = (
    (runs, "/", "runs"),
    (overview, "/runs/<run_id>", "run"),
    (layers, "/runs/<run_id>/layers", "layers"),
    (distributions, "/runs/<run_id>/distributions", "distributions"),
    (events, "/runs/<run_id>/events", "events"),
    (control, "/runs/<run_id>/control", "control"),
    (compare, "/compare", "compare"),
)


def create_dash(api_url: str, *, auth: bool, secret: str, secure_cookie: bool = False) -> Dash:
    """The dashboard, reading the API at ``api_url`` with each session's token."""
    common.configure(common.Config(api_url=api_url.rstrip("/"), auth=auth))
    app = Dash(
        __name__,
        use_pages=True,
        pages_folder="",
        assets_folder=str(ASSETS),
        title="trimtab",
        update_title=None,  # type: ignore[arg-type]  # no "Updating..." flicker in the tab title on every live tick
        suppress_callback_exceptions=True,  # each page's components exist only on that page
    )
    session.install(app.server, api_url, auth=auth, secret=secret, secure_cookie=secure_cookie)
    for module, template, title in PAGES:
        options: dict[str, Any] = {"path": template} if "<" not in template else {"path_template": template}
        dash.register_page(  # type: ignore[no-untyped-call]
            module.__name__, name=title, title=f"trimtab: {title}", layout=module.layout, **options
        )
        module.register(app)
    app.layout = shell
    return app


def shell() -> html.Div:
    """The frame around every page: the navigation bar, then the page."""
    user = session.who(common.CONFIG.auth)
    right: list[Any] = []
    if user:
        right = [html.Span(user, className="user", id="nav-user"), html.A("Log out", href="/logout", id="nav-logout")]
    return html.Div(
        [
            html.Header(
                [
                    dcc.Link("trimtab", href="/", className="brand"),
                    dcc.Link("Runs", href="/", id="nav-runs"),
                    dcc.Link("Compare", href="/compare", id="nav-compare"),
                    html.Span(right, className="right"),
                ],
                className="nav",
            ),
            dash.page_container,
        ]
    )
