"""``trimtab server``: check or upgrade the schema, then run uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn

from trimtab.errors import TrimtabError
from trimtab.server.app import create_app
from trimtab.server.db import migrate
from trimtab.server.db.engine import make_engine
from trimtab.server.settings import Settings

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


def serve(settings: Settings) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request: the dashboard makes many
    settings.check_bind()
    try:
        prepare_database(settings)
    except TrimtabError as exc:
        print(f"trimtab: {exc.message}", file=sys.stderr)
        return 2
    app = create_app(settings)
    where = f"http://{settings.host}:{settings.port}"
    print(
        f"trimtab server on {where}  (API docs {where}/docs; database {_safe(settings.database_url)}; "
        f"auth {'on' if settings.auth else 'OFF (loopback only)'})",
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
