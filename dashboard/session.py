"""Log in once with an API token (pasted in the form, or from the link ``trimtab server``
prints); a signed, HTTP-only session cookie carries it afterwards.

The cookie is Flask's session (signed with the dashboard's secret by itsdangerous, HttpOnly,
SameSite=Lax so other sites cannot post callbacks with it). It holds the token and the
scopes the API reported for it: the token never reaches page scripts, and the control panel
is offered only when the scopes allow ``control``. The API checks every call anyway.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from html import escape
from typing import Any
from urllib.parse import urlparse

import flask

from trimtab.dashboard.client import ApiClient, ApiError

COOKIE = "trimtab_session"
OPEN_PATHS = frozenset({"/login", "/logout", "/_favicon.ico"})
OPEN_PREFIXES = ("/_dash-component-suites/", "/assets/")  # static files, no data


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def install(server: flask.Flask, api_url: str, *, auth: bool, secret: str, secure_cookie: bool) -> None:
    """Add /login and /logout, and turn away requests without a session when auth is on."""
    server.secret_key = secret
    server.config.update(
        SESSION_COOKIE_NAME=COOKIE,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=secure_cookie,
        PERMANENT_SESSION_LIFETIME=timedelta(days=7),
    )

    @server.before_request
    def guard() -> Any:
        path = flask.request.path
        if not auth or "token" in flask.session or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return None
        if flask.request.method == "GET" and not flask.request.path.startswith("/_dash"):
            return flask.redirect(f"/login?next={_safe_next(flask.request.full_path)}")
        body = {"error": {"code": "unauthorized", "message": "log in at /login first"}}
        return flask.jsonify(body), 401

    @server.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        next_url = _safe_next(flask.request.values.get("next", "/"))
        if not auth:
            return flask.redirect(next_url)
        if flask.request.method == "GET" and not flask.request.args.get("token"):
            return _login_page(next_url, None)
        # POST from the form, or GET with ?token= (the link `trimtab server` prints for this
        # machine's token: one click logs in, then the token leaves the address bar)
        token = (flask.request.values.get("token") or "").strip()
        if not token:
            return _login_page(next_url, "Paste an API token."), 400
        try:
            me = ApiClient(api_url, token).whoami()
        except ApiError as exc:
            status = exc.status if 400 <= exc.status < 500 else 502
            return _login_page(next_url, exc.message), status
        flask.session.clear()
        flask.session.permanent = True
        flask.session.update(token=token, name=me["name"], scopes=sorted(me["scopes"]))
        return flask.redirect(next_url)

    @server.route("/logout")
    def logout() -> Any:
        flask.session.clear()
        return flask.redirect("/login" if auth else "/")


def token() -> str | None:
    """The session's token (None when auth is off)."""
    value = flask.session.get("token")
    return str(value) if value else None


def can(scope: str, auth: bool) -> bool:
    """Whether the session's token has ``scope`` (admin has every scope; without auth, everyone does)."""
    if not auth:
        return True
    scopes = flask.session.get("scopes") or []
    return scope in scopes or "admin" in scopes


def who(auth: bool) -> str | None:
    return str(flask.session.get("name")) if auth and flask.session.get("name") else None


def _safe_next(target: str) -> str:
    """Only paths on this site: an open redirect would let a link send people elsewhere after login."""
    parsed = urlparse(target)
    unsafe = "\\" in target or any(ord(c) < 32 for c in target)  # browsers read /\x as //x
    if unsafe or parsed.scheme or parsed.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target.rstrip("?") or "/"


def _login_page(next_url: str, error: str | None) -> str:
    message = f'<p class="error" id="login-error">{escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>trimtab: log in</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #f6f7f9; display: flex; justify-content: center; }}
form {{ background: white; margin-top: 12vh; padding: 2em 2.5em; border-radius: 8px;
        box-shadow: 0 1px 4px rgba(0,0,0,.15); width: 26em; }}
h1 {{ font-size: 1.4em; margin-top: 0; }} input {{ width: 100%; padding: .5em; margin: .5em 0 1em; }}
button {{ padding: .5em 1.2em; }} .error {{ color: #b00020; }} .hint {{ color: #666; font-size: .85em; }}
</style></head>
<body><form method="post" action="/login">
<h1>trimtab</h1>
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="off" autofocus>
<input type="hidden" name="next" value="{escape(next_url)}">
{message}
<button id="login-submit" type="submit">Log in</button>
<p class="hint">Create one with <code>trimtab token create --scopes read,control</code>.
A token with only <code>read</code> shows the run without its control panel.
A <code>trimtab server</code> started on this machine with its default database prints a
link that logs you in.</p>
</form></body></html>"""
