"""Shared fixtures: databases (a real SQLite file, and a real PostgreSQL database when
``TRIMTAB_TEST_DATABASE_URL`` is set), a real ``trimtab server`` subprocess on a free port,
and a guard that turns any error the agent swallowed into a test failure."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ServerProcess
from trimtab import internal

PG_ENV = "TRIMTAB_TEST_DATABASE_URL"


def _backends() -> list[str]:
    return ["sqlite", "postgres"] if os.environ.get(PG_ENV) else ["sqlite"]


@pytest.fixture(autouse=True)
def own_data_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data dir of the test's own (agents and servers it starts inherit it): a local-token
    file a `trimtab server` left on this machine must not reach the tests' agents."""
    monkeypatch.setenv("TRIMTAB_DATA_DIR", str(tmp_path_factory.mktemp("data")))


@pytest.fixture(autouse=True)
def no_swallowed_agent_errors() -> Iterator[None]:
    before = internal.error_count()
    yield
    assert internal.error_count() == before, "the agent swallowed an internal error (see the log above)"


@pytest.fixture(params=_backends())
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'trimtab.db'}"
        return
    yield from _postgres_database()


def _postgres_database() -> Iterator[str]:
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(os.environ[PG_ENV])
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"trimtab_t_{uuid.uuid4().hex[:12]}"
    # No skip: with the variable set, an unreachable PostgreSQL is a failure.
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def migrated_db(db_url: str) -> str:
    from trimtab.server.db import migrate

    migrate.upgrade(db_url)
    return db_url


@pytest.fixture
def server(migrated_db: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A real trimtab server (uvicorn) on a free port, auth off, on a migrated database."""
    proc = ServerProcess(migrated_db, tmp_path / "server.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
