"""``trimtab dashboard --api-url URL``: the dashboard on its own, against a remote trimtab API (or a
server on this machine, whose local token it offers as a login link)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from urllib.parse import urlsplit

import httpx
import uvicorn
from a2wsgi import WSGIMiddleware

from trimtab.addresses import is_loopback
from trimtab.dashboard.app import create_dash
from trimtab.dashboard.session import new_secret
from trimtab.local_token import local_token_path, read_local_token


def api_auth(api_url: str) -> bool:
    """Whether the API wants tokens: asked once at start, with no token."""
    try:
        resp = httpx.get(f"{api_url.rstrip('/')}/api/v1/whoami", timeout=10)
    except httpx.HTTPError as exc:
        raise SystemExit(f"trimtab dashboard: the API at {api_url} did not answer: {exc}") from None
    if resp.status_code == 200:
        return False
    if resp.status_code == 401:
        return True
    raise SystemExit(f"trimtab dashboard: {api_url}/api/v1/whoami answered {resp.status_code}: is it a trimtab server?")


def local_login_token(api_url: str) -> str | None:
    """The token ``trimtab server`` left on this machine (local_token.py), when the API is on a
    loopback address and accepts it: the dashboard prints a one-click login link with it, as
    the server does. None for a remote API, a missing file or a token the API refuses."""
    host = urlsplit(api_url).hostname
    if host is None or not is_loopback(host):
        return None
    token = read_local_token(local_token_path())
    if token is None:
        return None
    try:
        resp = httpx.get(
            f"{api_url.rstrip('/')}/api/v1/whoami", headers={"authorization": f"Bearer {token}"}, timeout=10
        )
    except httpx.HTTPError:
        return None
    return token if resp.status_code == 200 else None


def serve_dashboard(api_url: str, host: str, port: int, secret: str | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    auth = api_auth(api_url)
    if not auth and not is_loopback(host):
        print(
            f"trimtab dashboard: refusing to serve on {host!r}: the API at {api_url} runs without auth, so anyone "
            "reaching this port could steer its runs. Bind to 127.0.0.1, or turn auth on in the server.",
            file=sys.stderr,
        )
        return 2
    app = create_dash(api_url, auth=auth, secret=secret or new_secret())
    where = f"http://{host}:{port}"
    print(f"trimtab dashboard on {where} reading {api_url} (login {'on' if auth else 'off'})", flush=True)
    token = local_login_token(api_url) if auth else None
    if token is not None:
        print(f"trimtab: this machine's token logs in: {where}/login?token={token}", flush=True)
    uvicorn.run(WSGIMiddleware(app.server), host=host, port=port, log_level="info", access_log=False)  # type: ignore[arg-type]
    return 0


def run_command(args: argparse.Namespace) -> int:
    """``trimtab dashboard`` with its parsed arguments; the exit status."""
    secret = args.session_secret or os.environ.get("TRIMTAB_SESSION_SECRET")
    return serve_dashboard(args.api_url, args.host, args.port, secret)
