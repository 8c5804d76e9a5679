"""Migration 0005: a database at 0004 with data in it gains autopilot_policies and keeps the
rest; one policy per project and one per run, NULL run ids included, on both backends."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from trimtab.server.db import migrate
from trimtab.server.db.engine import make_engine

POLICY = (
    "INSERT INTO autopilot_policies (project_id, run_id, policy, updated_at, updated_by)"
    " VALUES ({project}, {run}, '{{\"enabled\": true}}', 1.0, 'ops')"
)


def test_upgrade_from_0004_keeps_the_data_and_adds_autopilot_policies(db_url: str) -> None:
    migrate.upgrade(db_url, "0004_commands")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (id, name, created_at) VALUES (1, 'old', 1.0), (2, 'b', 1.0)"))
            conn.execute(
                text(
                    "INSERT INTO runs (id, uid, project_id, name, status, created_at, last_seen_at, config, drops)"
                    " VALUES (7, 'uid-7', 1, 'before', 'running', 1.0, 2.0, '{}', '{}'),"
                    " (8, 'uid-8', 1, 'other', 'running', 1.0, 2.0, '{}', '{}')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO commands (id, run_id, kind, args, status, source, created_by, created_at,"
                    " expires_at, ranks) VALUES ('c-7', 7, 'pause', '{}', 'pending', 'human', 'ops', 1.0, 2.0, '{}')"
                )
            )

        migrate.upgrade(db_url)

        assert migrate.current_revision(engine) == migrate.head_revision()
        with engine.begin() as conn:
            assert conn.execute(text("SELECT kind FROM commands WHERE id = 'c-7'")).scalar_one() == "pause"
            conn.execute(text(POLICY.format(project=1, run="NULL")))
            conn.execute(text(POLICY.format(project=2, run="NULL")))
            conn.execute(text(POLICY.format(project=1, run=7)))
            conn.execute(text(POLICY.format(project=1, run=8)))
        for project, run in ((1, "NULL"), (1, 7), (2, 7), (1, 99), (99, "NULL")):
            # a second project policy (NULL run ids are not distinct here), a second policy of
            # a run, and references to rows that do not exist are all refused
            with pytest.raises(IntegrityError), engine.begin() as conn:
                conn.execute(text(POLICY.format(project=project, run=run)))
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM runs WHERE id = 7"))  # a run's policy goes with it
            left = conn.execute(text("SELECT project_id, run_id FROM autopilot_policies ORDER BY id")).all()
            assert [tuple(r) for r in left] == [(1, None), (2, None), (1, 8)]
            conn.execute(text("DELETE FROM projects WHERE id = 1"))  # and a project's with it
            left = conn.execute(text("SELECT project_id, run_id FROM autopilot_policies")).all()
            assert [tuple(r) for r in left] == [(2, None)]
    finally:
        engine.dispose()
