"""Migrations are the schema: the migrated database equals the models, and a server refuses
a database that is behind."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tests.helpers import free_port, run_cli
from trimtab.server import migrate
from trimtab.server.engine import make_engine
from trimtab.server.tables import metadata


def test_migrated_schema_matches_the_models(migrated_db: str) -> None:
    engine = make_engine(migrated_db)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
        assert diff == []
        assert migrate.current_revision(engine) == migrate.head_revision()
    finally:
        engine.dispose()


def test_upgrade_is_idempotent(migrated_db: str) -> None:
    migrate.upgrade(migrated_db)
    engine = make_engine(migrated_db)
    try:
        assert migrate.current_revision(engine) == migrate.head_revision()
    finally:
        engine.dispose()


def test_server_refuses_a_database_without_the_schema_and_says_what_to_run(db_url: str) -> None:
    result = run_cli("server", "--port", str(free_port()), "--db", db_url, "--no-auth", check=False)
    assert result.returncode == 2
    assert "trimtab db upgrade --db" in result.stderr
    assert "has no trimtab schema" in result.stderr


def test_db_upgrade_command_then_current(db_url: str) -> None:
    assert "empty" in run_cli("db", "current", "--db", db_url).stdout
    run_cli("db", "upgrade", "--db", db_url)
    assert run_cli("db", "current", "--db", db_url).stdout.strip() == migrate.head_revision()
