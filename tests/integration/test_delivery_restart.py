"""Undelivered alerts survive a server restart: a real ``trimtab server`` subprocess is killed
(or stopped mid-send) with deliveries pending, restarted on the same database, and the
receiver gets each alert exactly once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ServerProcess, wait_until
from tests.server.outbox_rows import add_sink, deliveries, queue, seed_alert
from tests.server.receiver import HANG, OK, receiver
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store

FAST_RETRIES = {
    "TRIMTAB_DELIVERY_BACKOFF_BASE_S": "0.1",
    "TRIMTAB_DELIVERY_BACKOFF_CAP_S": "0.3",
    "TRIMTAB_DELIVERY_POLL_S": "0.1",
    "TRIMTAB_DELIVERY_TIMEOUT_S": "2",
}


@pytest.fixture
def store(migrated_db: str) -> Iterator[Store]:
    engine = make_engine(migrated_db)
    yield Store(engine)
    engine.dispose()


def _server(migrated_db: str, tmp_path: Path, **env: str) -> ServerProcess:
    proc = ServerProcess(migrated_db, tmp_path / "server.log")
    proc.env = {**FAST_RETRIES, **env}
    return proc


def test_pending_deliveries_survive_a_killed_server(migrated_db: str, tmp_path: Path, store: Store) -> None:
    up = {"ok": False}
    with receiver(lambda n: OK if up["ok"] else 500) as hook:
        add_sink(store, hook.url)
        first = seed_alert(store, run_name="before")
        queue(store, first)
        server = _server(migrated_db, tmp_path)
        server.start()
        try:
            wait_until(lambda: len(hook.all()) >= 2, 60, "a few failed attempts")
            server.kill()
            assert [row.status for row in deliveries(store)] == ["pending"]
            up["ok"] = True
            server.start()
            [got] = hook.wait_for(1)
            wait_until(lambda: deliveries(store)[0].status == "delivered", 60, "the delivery recorded")
            # Later traffic flows through the restarted worker; the first alert is not sent again.
            queue(store, seed_alert(store, run_name="after"))
            hook.wait_for(2)
        finally:
            server.stop()
    delivered_ids = [r.json()["alert"]["id"] for r in hook.answered(OK)]
    assert got.json()["alert"]["id"] == first and delivered_ids.count(first) == 1
    # An attempt is counted when it is claimed, so the kill may land between the claim and the
    # request: at most one counted attempt never reached the receiver.
    sent = len([r for r in hook.all() if r.json()["alert"]["id"] == first])
    assert sent <= deliveries(store)[0].attempts <= sent + 1


def test_a_send_cut_short_by_shutdown_is_sent_after_restart(migrated_db: str, tmp_path: Path, store: Store) -> None:
    with receiver(lambda n: HANG if n == 0 else OK) as hook:
        add_sink(store, hook.url)
        queue(store, seed_alert(store))
        server = _server(migrated_db, tmp_path, TRIMTAB_DELIVERY_TIMEOUT_S="300")
        server.start()
        try:
            wait_until(lambda: len(hook.all()) == 1, 60, "the first request hanging")
            server.stop()  # SIGTERM: the worker gives in-flight sends a grace, then releases them
            [row] = deliveries(store)
            assert (row.status, row.attempts) == ("pending", 1)
            server.start()
            hook.wait_for(1)
            wait_until(lambda: deliveries(store)[0].status == "delivered", 60, "the delivery recorded")
        finally:
            server.stop()
    assert [r.answer for r in hook.all()] == [HANG, OK]
    assert deliveries(store)[0].attempts == 2
