"""What the stream survives besides clean outages: a database that hiccups under the server,
a server that accepts TCP and then never answers, an agent killed after part of its spool was
acknowledged, a server that dies between the last ack and bye."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from sqlalchemy.engine import make_url

import trimtab
from tests.helpers import (
    ServerProcess,
    assert_exact_series,
    finish_agent,
    free_port,
    run_by_name,
    start_agent,
    value_for,
    wait_logged,
    wait_until,
)
from trimtab.spool import Spool


@contextlib.contextmanager
def _database_hiccup(db_url: str, seconds: float) -> Iterator[None]:
    """Make the server's database refuse work for a while: a write lock held past the
    server's lock timeout (SQLite's database lock; PostgreSQL's lock on the points table)."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        lite = sqlite3.connect(str(url.database), timeout=30, isolation_level=None)
        lite.execute("BEGIN IMMEDIATE")  # the server's writer now waits, then fails with 'locked'
        try:
            time.sleep(seconds)
            yield
        finally:
            lite.execute("ROLLBACK")
            lite.close()
        return
    import psycopg

    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn:
        conn.execute("LOCK TABLE scalar_points IN ACCESS EXCLUSIVE MODE")
        time.sleep(seconds)
        yield
        conn.rollback()


def test_database_hiccup_costs_no_batch(migrated_db: str, tmp_path: Path) -> None:
    server = ServerProcess(migrated_db, tmp_path / "server.log")
    server.env = {"TRIMTAB_LOCK_TIMEOUT_S": "0.5"}
    server.start()
    try:
        agent = start_agent(
            server.url,
            tmp_path / "spool",
            "hiccup",
            "--pause-every",
            "250",
            "--pause",
            "0.05",
        )
        wait_until(lambda: any(r["n_points"] > 0 for r in server.get("/api/v1/runs")), 60, "the first points")
        with _database_hiccup(migrated_db, 2.0):
            pass
        finish_agent(agent)
        assert "store_unavailable" in server.log(), "the hiccup never reached the writer; the test proves nothing"
        run = run_by_name(server, "hiccup")
        for key in ("loss", "grad_norm"):
            assert_exact_series(server, run["id"], key, range(10_000))
    finally:
        server.stop()


def test_a_server_that_never_answers_does_not_stop_spooling(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    port = listener.getsockname()[1]
    try:
        run = trimtab.init(
            server=f"http://127.0.0.1:{port}",
            name="stalled",
            spool_dir=str(tmp_path),
            connect_timeout=300,
            replay_orphans=False,
            flush_interval=0.05,
        )
        for step in range(2000):
            run.log({"loss": float(step)}, step=step)
        wait_until(lambda: bool(accepted), 10, "the agent to open its TCP connection")
        wait_until(lambda: run.stats()["queued_records"] == 0, 10, "the buffer to drain during the handshake")
        assert run.finish(timeout=3600) is False  # gives up after the offline grace, not an hour
        (spool_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        spool = Spool(spool_dir)
        points = 0
        for _, location in spool.recover():
            frame = msgpack.unpackb(spool.read(location))
            points += sum(len(s["steps"]) // 8 for s in frame["scalars"])
        spool.close(remove_if_empty=False)
        assert points == 2000, "everything logged must be in the spool for the next process"
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def test_partly_acknowledged_spool_of_a_killed_agent_is_stored_exactly_once(
    server: ServerProcess, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    agent = start_agent(
        server.url,
        spool,
        "partial",
        "--hang-after-logging",
        "--pause-every",
        "500",
        "--pause",
        "0.1",
    )
    try:
        wait_until(lambda: any(r["n_points"] > 0 for r in server.get("/api/v1/runs")), 60, "the first points")
        server.kill()  # some batches acked, the rest now only in the spool
        wait_logged(agent)
        agent.kill()
        agent.wait(10)
        server.start()
        stored_before = run_by_name(server, "partial")["n_points"]
        assert 0 < stored_before < 20_000
        finish_agent(start_agent(server.url, spool, "after", "--steps", "5"))
        wait_until(lambda: run_by_name(server, "partial")["n_points"] == 20_000, 60, "the replay")
        run = run_by_name(server, "partial")
        for key in ("loss", "grad_norm"):
            assert_exact_series(server, run["id"], key, range(10_000))
    finally:
        agent.kill()


def test_finish_is_not_clean_when_bye_cannot_be_delivered(server: ServerProcess, tmp_path: Path) -> None:
    run = trimtab.init(server=server.url, name="no-bye", spool_dir=str(tmp_path), replay_orphans=False)
    for step in range(100):
        run.log({"loss": value_for("loss", step)}, step=step)
    wait_until(
        lambda: run.stats()["connected"] and run.stats()["unacked_batches"] == 0 and run.stats()["queued_records"] == 0,
        30,
        "every batch acked",
    )
    server.kill()
    assert run.finish(timeout=3) is False
    server.start()
    assert run_by_name(server, "no-bye")["status"] != "finished"


@pytest.mark.parametrize("bad_key", ["nul\x00key", "surrogate\ud800"])
def test_an_unsendable_key_costs_only_its_own_points(server: ServerProcess, tmp_path: Path, bad_key: str) -> None:
    run = trimtab.init(server=server.url, name="badkey", spool_dir=str(tmp_path), replay_orphans=False)
    for step in range(1000):
        run.log({"loss": value_for("loss", step), **({bad_key: 1.0} if step == 500 else {})}, step=step)
    assert run.finish(timeout=60) is True
    assert run.drops.snapshot() == {"bad_key": 1}
    assert_exact_series(server, run_by_name(server, "badkey")["id"], "loss", range(1000))


def test_finish_tries_once_more_to_reach_a_server_that_came_back(migrated_db: str, tmp_path: Path) -> None:
    """The server is down while the run trains, so the agent's backoff grows past finish()'s
    5 s offline grace; the server comes back just before finish(): one more attempt at once
    delivers everything and the bye, instead of leaving the run to a later replay."""
    port = free_port()
    run = trimtab.init(server=f"http://127.0.0.1:{port}", name="late-server", spool_dir=str(tmp_path / "spool"))
    for step in range(50):
        run.log({"loss": value_for("loss", step)}, step=step)
    wait_until(lambda: run._sender._backoff.attempts >= 1, 30, "a failed connection attempt")
    # After long enough down, the backoff puts the next attempt up to 30 s away: say it did
    # (waiting for the doubling to get there would take most of a minute).
    run._sender._next_attempt = time.monotonic() + 3600
    server = ServerProcess(migrated_db, tmp_path / "server.log", port=port)
    server.start()
    try:
        assert run.finish(timeout=30) is True
        got = run_by_name(server, "late-server")
        assert got["status"] == "finished"
        assert_exact_series(server, got["id"], "loss", range(50))
    finally:
        server.stop()
