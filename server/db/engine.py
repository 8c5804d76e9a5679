"""Database engines: SQLite with WAL and a busy timeout, or PostgreSQL through psycopg 3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url


def normalize_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` and pick the psycopg 3 driver for them."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, lock_timeout_s: float = 30.0, **kwargs: Any) -> Engine:
    """An engine for ``url``. A statement waits up to ``lock_timeout_s`` for a lock someone
    else holds (SQLite's busy timeout, PostgreSQL's lock_timeout), then fails, and ingest
    answers ``store_unavailable`` so agents resend later. Database errors never show the
    statement's parameters (a sink's secret and URL, tokens): they are logged."""
    url = normalize_url(url)
    kwargs.setdefault("hide_parameters", True)
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": lock_timeout_s, "check_same_thread": False}
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        busy_ms = int(lock_timeout_s * 1000)
        event.listen(engine, "connect", lambda conn, _record: _sqlite_pragmas(conn, busy_ms))
        return engine
    options = f"-c lock_timeout={int(lock_timeout_s * 1000)}"
    return create_engine(
        url, pool_pre_ping=True, pool_size=8, max_overflow=8, connect_args={"options": options}, **kwargs
    )


def _sqlite_pragmas(dbapi_conn: Any, busy_ms: int) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the ingest writer
    cur.execute("PRAGMA synchronous=NORMAL")  # durable against process death; WAL keeps it consistent
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={busy_ms}")
    cur.close()
