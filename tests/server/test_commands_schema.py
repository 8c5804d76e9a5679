"""Migration 0004: a database at 0003 with data in it gains the commands table and keeps the rest."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from trimtab.server.db import migrate
from trimtab.server.db.engine import make_engine

COMMAND = (
    "INSERT INTO commands (id, run_id, kind, args, status, source, created_by, created_at, expires_at, ranks)"
    " VALUES ('{id}', {run}, 'reduce_lr', '{{\"factor\": 0.5}}', 'pending', 'human', 'ops', 1.0, 3601.0, '{{}}')"
)


def test_upgrade_from_0003_keeps_the_data_and_adds_the_commands_table(db_url: str) -> None:
    migrate.upgrade(db_url, "0003_alerts")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (id, name, created_at) VALUES (1, 'old', 1.0)"))
            conn.execute(
                text(
                    "INSERT INTO runs (id, uid, project_id, name, status, created_at, last_seen_at, config, drops)"
                    " VALUES (7, 'uid-7', 1, 'before', 'running', 1.0, 2.0, '{\"lr\": 0.1}', '{}'),"
                    " (8, 'uid-8', 1, 'other', 'running', 1.0, 2.0, '{}', '{}')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO alert_rules (project_id, run_id, name, body, created_at, updated_at)"
                    " VALUES (1, 7, 'spike', '{}', 1.0, 1.0)"
                )
            )

        migrate.upgrade(db_url)

        assert migrate.current_revision(engine) == migrate.head_revision()
        with engine.begin() as conn:
            run = conn.execute(text("SELECT uid, name, status FROM runs WHERE id = 7")).one()
            assert tuple(run) == ("uid-7", "before", "running")
            assert conn.execute(text("SELECT name FROM alert_rules")).scalar_one() == "spike"
            conn.execute(text(COMMAND.format(id="c-7", run=7)))
            conn.execute(text(COMMAND.format(id="c-8", run=8)))
            row = conn.execute(
                text("SELECT kind, status, delivered_at, finished_at, step, detail FROM commands WHERE id = 'c-7'")
            ).one()
            assert tuple(row) == ("reduce_lr", "pending", None, None, None, None)
        with pytest.raises(IntegrityError), engine.begin() as conn:  # ids are unique
            conn.execute(text(COMMAND.format(id="c-7", run=8)))
        with pytest.raises(IntegrityError), engine.begin() as conn:  # a command belongs to a run
            conn.execute(text(COMMAND.format(id="c-9", run=99)))
        with engine.begin() as conn:
            # deleting a run takes its commands along, and only its own
            conn.execute(text("DELETE FROM runs WHERE id = 7"))
            assert conn.execute(text("SELECT id FROM commands")).scalars().all() == ["c-8"]
    finally:
        engine.dispose()
