"""``trimtab dashboard --api-url URL``: the dashboard on its own, against a remote trimtab API."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import httpx
import uvicorn
from a2wsgi import WSGIMiddleware

from trimtab.addresses import is_loopback
from trimtab.dashboard.app import create_dash
from trimtab.dashboard.session import new_secret


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
    print(f"trimtab dashboard on http://{host}:{port} reading {api_url} (login {'on' if auth else 'off'})", flush=True)
    uvicorn.run(WSGIMiddleware(app.server), host=host, port=port, log_level="info", access_log=False)  # type: ignore[arg-type]
    return 0


def run_command(args: argparse.Namespace) -> int:
    """``trimtab dashboard`` with its parsed arguments; the exit status."""
    secret = args.session_secret or os.environ.get("TRIMTAB_SESSION_SECRET")
    return serve_dashboard(args.api_url, args.host, args.port, secret)
