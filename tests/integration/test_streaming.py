"""End to end: a real agent process streams into a real server process, through outages.

Each test runs on SQLite and, when TRIMTAB_TEST_DATABASE_URL is set, on PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import (
    ROOT,
    ServerProcess,
    assert_exact_series,
    finish_agent,
    run_by_name,
    start_agent,
    subprocess_env,
    value_for,
    wait_logged,
    wait_until,
)

STEPS = 10_000


def _check_run(server: ServerProcess, name: str, steps: int = STEPS) -> None:
    run = run_by_name(server, name)
    assert run["n_points"] == 2 * steps
    assert run["status"] == "finished"
    for key in ("loss", "grad_norm"):
        assert_exact_series(server, run["id"], key, range(steps))


def test_every_point_arrives_exactly_once_with_exact_values(server: ServerProcess, tmp_path: Path) -> None:
    finish_agent(start_agent(server.url, tmp_path / "spool", "plain"))
    _check_run(server, "plain")
    assert not any((tmp_path / "spool").glob("*/seg-*")), "acked batches must leave the spool"


def test_server_killed_mid_stream_loses_and_duplicates_nothing(server: ServerProcess, tmp_path: Path) -> None:
    agent = start_agent(server.url, tmp_path / "spool", "killed-server", "--pause-every", "200", "--pause", "0.05")
    wait_until(lambda: any(r["n_points"] > 0 for r in server.get("/api/v1/runs")), 60, "the first points")
    server.kill()
    time.sleep(0.5)
    assert agent.poll() is None, "the training process must keep running while the server is down"
    server.start()
    finish_agent(agent)
    _check_run(server, "killed-server")


def test_server_down_when_the_agent_starts(db_url: str, tmp_path: Path) -> None:
    from trimtab.server.db import migrate

    migrate.upgrade(db_url)
    server = ServerProcess(db_url, tmp_path / "server.log")
    agent = start_agent(server.url, tmp_path / "spool", "late-server", "--pause-every", "1000", "--pause", "0.05")
    try:
        time.sleep(1.5)
        assert agent.poll() is None
        server.start()
        finish_agent(agent)
        _check_run(server, "late-server")
    finally:
        agent.kill()
        server.stop()


def test_killed_agent_spool_is_replayed_by_the_next_process(db_url: str, tmp_path: Path) -> None:
    from trimtab.server.db import migrate

    migrate.upgrade(db_url)
    server = ServerProcess(db_url, tmp_path / "server.log")
    spool = tmp_path / "spool"
    first = start_agent(server.url, spool, "killed-agent", "--hang-after-logging")
    try:
        wait_logged(first)
        first.kill()  # SIGKILL: no atexit, no finish
        first.wait(10)
        assert any(spool.glob("*/seg-*")), "the killed agent left no spool"
        server.start()
        finish_agent(start_agent(server.url, spool, "next-process", "--steps", "10"))
        wait_until(lambda: run_by_name(server, "killed-agent")["n_points"] == 2 * STEPS, 60, "the replay")
        run = run_by_name(server, "killed-agent")
        for key in ("loss", "grad_norm"):
            assert_exact_series(server, run["id"], key, range(STEPS))
        assert run["status"] != "finished", "a replay must not mark the dead run finished"
        wait_until(lambda: not any(spool.glob("*/seg-*")), 30, "the replayed spool to be removed")
    finally:
        first.kill()
        server.stop()


def test_a_run_that_finished_offline_keeps_its_real_start_and_end_when_replayed(db_url: str, tmp_path: Path) -> None:
    """The server is down for the whole run, which finishes with everything in its spool; the
    next process on the machine replays it: the run shows when it really started and ended,
    and ends finished (its process did reach finish()), not when it was replayed."""
    from datetime import datetime

    import trimtab
    from trimtab.server.db import migrate

    migrate.upgrade(db_url)
    server = ServerProcess(db_url, tmp_path / "server.log")
    spool = str(tmp_path / "spool")
    began = time.time()
    run = trimtab.init(server=server.url, name="offline-run", spool_dir=spool)
    for step in range(100):
        run.log({"loss": value_for("loss", step)}, step=step)
    assert run.finish(timeout=10) is False  # unreachable: kept in the spool
    ended = time.time()
    time.sleep(1.5)  # so that "now" at the replay is told apart from the run's own times
    server.start()
    try:
        replayed_at = time.time()
        assert trimtab.init(server=server.url, name="next-process", spool_dir=spool).finish(timeout=60)
        wait_until(lambda: run_by_name(server, "offline-run")["status"] == "finished", 30, "the replayed run to end")
        got = run_by_name(server, "offline-run")
        assert got["n_points"] == 100
        started_at = datetime.fromisoformat(got["created_at"]).timestamp()
        finished_at = datetime.fromisoformat(got["finished_at"]).timestamp()
        assert began - 0.01 <= started_at <= finished_at <= ended + 0.01 < replayed_at
    finally:
        server.stop()


def test_a_batch_larger_than_a_frame_is_split(server: ServerProcess, tmp_path: Path) -> None:
    import trimtab

    n = 500_000  # one key, 24 bytes a point: 12 MB, over the 8 MiB frame limit
    run = trimtab.init(
        server=server.url,
        name="huge",
        spool_dir=str(tmp_path),
        replay_orphans=False,
        max_batch_points=10_000_000,
        max_queue=10_000_000,
        flush_interval=3600,
    )
    for step in range(n):
        run.log({"x": float(step)}, step=step)
    assert run.finish(timeout=120) is True
    assert run_by_name(server, "huge")["n_points"] == n


def test_interpreter_exit_flushes_without_finish(server: ServerProcess, tmp_path: Path) -> None:
    code = (
        "import trimtab\n"
        f"run = trimtab.init(server={server.url!r}, name='atexit', spool_dir={str(tmp_path)!r})\n"
        "for step in range(1000):\n"
        "    run.log({'loss': float(step)}, step=step)\n"
        "# no finish(): the atexit hook must flush\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env(), cwd=ROOT, timeout=120)
    run = run_by_name(server, "atexit")
    assert (run["n_points"], run["status"]) == (1000, "finished")
