"""Alembic, driven from code: upgrade a database, and check it is at the revision the code expects."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import trimtab.migrations
from trimtab.errors import ErrorCode, TrimtabError
from trimtab.server.db.engine import make_engine, normalize_url


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(trimtab.migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str, revision: str = "head") -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def check_schema(engine: Engine, url_for_message: str) -> None:
    """Raise SCHEMA_OUT_OF_DATE unless the database is at the code's head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        state = "has no trimtab schema" if current is None else f"is at revision {current}"
        raise TrimtabError(
            ErrorCode.SCHEMA_OUT_OF_DATE,
            f"the database {state}; this trimtab needs {head}. Run: trimtab db upgrade --db '{url_for_message}'",
        )
