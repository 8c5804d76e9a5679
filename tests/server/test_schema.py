"""Migrations are the schema: the migrated database equals the models, and a server refuses
a database that is behind."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from tests.helpers import free_port, run_cli
from trimtab.server.db import migrate
from trimtab.server.db.engine import make_engine
from trimtab.server.db.tables import metadata


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


def test_upgrade_from_0001_keeps_the_data_and_gives_keys_rank_0(db_url: str) -> None:
    migrate.upgrade(db_url, "0001_initial_schema")
    engine = make_engine(db_url)
    try:
        assert migrate.current_revision(engine) == "0001_initial_schema"
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (id, name, created_at) VALUES (1, 'old', 1.0)"))
            conn.execute(
                text(
                    "INSERT INTO runs (id, uid, project_id, name, status, created_at, last_seen_at, config, drops,"
                    " n_points, last_step) VALUES (7, 'uid-7', 1, 'before', 'finished', 1.0, 2.0, '{\"lr\": 0.1}',"
                    " '{}', 3, 12)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO metric_keys (id, run_id, kind, name) VALUES"
                    " (3, 7, 'scalar', 'loss'), (4, 7, 'histogram', 'weights/w')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO scalar_points (key_id, step, wall_time, value) VALUES"
                    " (3, 10, 100.5, 2.5), (3, 11, 101.5, 0.125), (3, 12, 102.5, -1e300)"
                )
            )
            conn.execute(
                text("INSERT INTO ingested_seqs (run_id, rank, seq, ingested_at) VALUES (7, 0, 1, 1.0), (7, 0, 2, 1.0)")
            )

        migrate.upgrade(db_url)

        assert migrate.current_revision(engine) == migrate.head_revision()
        with engine.begin() as conn:
            keys = conn.execute(text("SELECT id, run_id, kind, name, rank FROM metric_keys ORDER BY id")).all()
            assert [tuple(k) for k in keys] == [(3, 7, "scalar", "loss", 0), (4, 7, "histogram", "weights/w", 0)]
            points = conn.execute(text("SELECT key_id, step, wall_time, value FROM scalar_points ORDER BY step")).all()
            assert [tuple(p) for p in points] == [(3, 10, 100.5, 2.5), (3, 11, 101.5, 0.125), (3, 12, 102.5, -1e300)]
            run = conn.execute(text("SELECT uid, name, status, n_points, last_step FROM runs WHERE id = 7")).one()
            assert tuple(run) == ("uid-7", "before", "finished", 3, 12)
            assert conn.execute(text("SELECT count(*) FROM ingested_seqs")).scalar_one() == 2
            # the new unique constraint: the same name for another rank is fine, twice for one rank is not
            conn.execute(
                text("INSERT INTO metric_keys (id, run_id, kind, name, rank) VALUES (5, 7, 'scalar', 'loss', 1)")
            )
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(
                text("INSERT INTO metric_keys (id, run_id, kind, name, rank) VALUES (6, 7, 'scalar', 'loss', 1)")
            )
        with engine.begin() as conn:  # a key inserted without a rank is rank 0's (server default)
            conn.execute(text("INSERT INTO metric_keys (id, run_id, kind, name) VALUES (6, 7, 'scalar', 'lr')"))
            assert conn.execute(text("SELECT rank FROM metric_keys WHERE name = 'lr'")).scalar_one() == 0
            # the foreign key to runs survived SQLite's table rebuild
            conn.execute(text("DELETE FROM runs WHERE id = 7"))
            assert conn.execute(text("SELECT count(*) FROM metric_keys")).scalar_one() == 0
    finally:
        engine.dispose()


def test_upgrade_from_0002_keeps_the_data_and_adds_the_alert_tables(db_url: str) -> None:
    migrate.upgrade(db_url, "0002_metric_key_rank")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (id, name, created_at) VALUES (1, 'old', 1.0)"))
            conn.execute(
                text(
                    "INSERT INTO runs (id, uid, project_id, name, status, created_at, last_seen_at, config, drops)"
                    " VALUES (7, 'uid-7', 1, 'before', 'running', 1.0, 2.0, '{}', '{}'),"
                    " (8, 'uid-8', 1, 'other', 'running', 1.0, 2.0, '{}', '{}')"
                )
            )
            conn.execute(
                text("INSERT INTO metric_keys (id, run_id, kind, name, rank) VALUES (3, 7, 'scalar', 'loss', 1)")
            )
            conn.execute(text("INSERT INTO scalar_points (key_id, step, wall_time, value) VALUES (3, 10, 100.5, 2.5)"))

        migrate.upgrade(db_url)

        assert migrate.current_revision(engine) == migrate.head_revision()
        with engine.begin() as conn:
            assert tuple(conn.execute(text("SELECT id, run_id, name, rank FROM metric_keys")).one()) == (
                3,
                7,
                "loss",
                1,
            )
            assert tuple(conn.execute(text("SELECT key_id, step, value FROM scalar_points")).one()) == (3, 10, 2.5)
            rule = "INSERT INTO alert_rules (project_id, run_id, name, body, created_at, updated_at) VALUES "
            # a project rule, and the same name overridden for run 7 and for run 8
            conn.execute(text(rule + "(1, NULL, 'spike', '{}', 1.0, 1.0), (1, 7, 'spike', '{}', 1.0, 1.0)"))
            conn.execute(text(rule + "(1, 8, 'spike', '{}', 1.0, 1.0)"))
            conn.execute(
                text(
                    "INSERT INTO alerts (id, run_id, project_id, rank, rule_name, key, detector, severity, status,"
                    " message, remedy, value, first_step, last_step, fired_at, updated_at, data) VALUES"
                    " (1, 7, 1, 0, 'spike', 'loss', 'nonfinite', 'critical', 'firing', 'm', 'r', NULL, 5, 5, 1.0,"
                    " 1.0, '{}')"
                )
            )
            alert = conn.execute(text("SELECT count, notified FROM alerts WHERE id = 1")).one()
            assert (alert[0], bool(alert[1])) == (1, False)  # server defaults
            conn.execute(
                text("INSERT INTO sinks (id, kind, name, url, created_at) VALUES (1, 'webhook', 'w', 'http://x', 1.0)")
            )
            assert bool(conn.execute(text("SELECT enabled FROM sinks")).scalar_one()) is True
            conn.execute(
                text(
                    "INSERT INTO alert_deliveries (alert_id, sink_id, event, payload, status, next_attempt_at,"
                    " created_at) VALUES (1, 1, 'firing', '{}', 'pending', 1.0, 1.0)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO detector_states (run_id, rank, rule_name, key, state, step, updated_at)"
                    " VALUES (7, 0, 'spike', 'loss', '{}', 5, 1.0)"
                )
            )
        # one project rule of a name, even though its run_id is NULL; one per run
        for duplicate in ("(1, NULL, 'spike', '{}', 1.0, 1.0)", "(1, 7, 'spike', '{}', 1.0, 1.0)"):
            with pytest.raises(IntegrityError), engine.begin() as conn:
                conn.execute(text(rule + duplicate))
        with engine.begin() as conn:
            # deleting a run takes its rules, alerts, their deliveries and its detector state along
            conn.execute(text("DELETE FROM runs WHERE id = 7"))
            for table, left in (("alert_rules", 2), ("alerts", 0), ("alert_deliveries", 0), ("detector_states", 0)):
                assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == left, table
            assert conn.execute(text("SELECT count(*) FROM sinks")).scalar_one() == 1
    finally:
        engine.dispose()
