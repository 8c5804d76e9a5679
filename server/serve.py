"""``trimtab server``: check or upgrade the schema, then run uvicorn."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn

from trimtab.errors import TrimtabError
from trimtab.local_token import FILE_NAME, read_local_token, write_local_token
from trimtab.server.app import create_app
from trimtab.server.db import migrate
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store
from trimtab.server.settings import Settings
from trimtab.server.tokens import create_token, verify_token

logger = logging.getLogger("trimtab.server")


def prepare_database(settings: Settings) -> None:
    """Upgrade the embedded default (or with --auto-upgrade); otherwise refuse an out-of-date schema."""
    url = settings.database_url
    if settings.embedded or settings.auto_upgrade:
        migrate.upgrade(url)
        return
    engine = make_engine(url)
    try:
        migrate.check_schema(engine, url)
    finally:
        engine.dispose()


def ensure_local_token(settings: Settings) -> tuple[str, Path] | None:
    """With auth on and the embedded database (a first-time, single-machine setup): the token
    in ``<data dir>/local-token``, created (scopes ingest, read, control) when the file is
    missing or its token no longer works. None otherwise: a deployment on its own database
    hands out its tokens itself."""
    if not settings.auth or not settings.embedded:
        return None
    path = settings.data_dir / FILE_NAME
    engine = make_engine(settings.database_url)
    try:
        store = Store(engine)
        token = read_local_token(path)
        if token is None or verify_token(store, token) is None:
            token = create_token(store, f"local ({path})"[:128], frozenset({"ingest", "read", "control"}))
            write_local_token(path, token)
    finally:
        engine.dispose()
    return token, path


def serve(settings: Settings) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request: the dashboard makes many
    settings.check_bind()
    try:
        prepare_database(settings)
    except TrimtabError as exc:
        print(f"trimtab: {exc.message}", file=sys.stderr)
        return 2
    local = ensure_local_token(settings)
    app = create_app(settings)
    where = f"http://{settings.host}:{settings.port}"
    print(
        f"trimtab server on {where}  (API docs {where}/docs; database {_safe(settings.database_url)}; "
        f"auth {'on' if settings.auth else 'OFF (loopback only)'})",
        flush=True,
    )
    if local is not None:
        token, path = local
        print(
            f"trimtab: token for this machine's agents in {path} (trimtab.init on this machine reads it).\n"
            f"trimtab: dashboard: {where}/login?token={token}",
            flush=True,
        )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ws_per_message_deflate=False,  # measured: deflate cuts loopback ingest 3-5x
        ws_max_size=settings.max_frame_bytes * 2,  # larger frames than ours get a clear error frame
        log_level="info",
        access_log=False,
    )
    return 0


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
