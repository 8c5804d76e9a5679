"""Alembic environment: runs migrations on a connection handed in, or on the configured URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from trimtab.server.db.engine import make_engine
from trimtab.server.db.tables import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("trimtab migrations run online only: use `trimtab db upgrade --db URL`")
run_migrations_online()
