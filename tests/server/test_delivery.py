"""The delivery worker against real local HTTP receivers and a real database (SQLite file and
PostgreSQL): signing, Slack format, retries, hanging and broken receivers, claiming."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import update

from tests.helpers import free_port, wait_until
from tests.server.outbox_rows import SECRET, add_sink, deliveries, queue, seed_alert
from tests.server.receiver import GARBAGE, HANG, OK, receiver
from trimtab import webhooks
from trimtab.server.alerts import outbox
from trimtab.server.alerts.delivery import DeliveryWorker
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store
from trimtab.server.db.tables import alert_deliveries
from trimtab.server.settings import Settings

FAST = {
    "delivery_timeout_s": 5.0,
    "delivery_backoff_base_s": 0.05,
    "delivery_backoff_cap_s": 0.2,
    "delivery_poll_s": 0.1,
}

StartWorker = Callable[..., DeliveryWorker]


@pytest.fixture
def store(migrated_db: str) -> Iterator[Store]:
    engine = make_engine(migrated_db)
    yield Store(engine)
    engine.dispose()


@pytest.fixture
def start_worker(migrated_db: str) -> Iterator[StartWorker]:
    """Start real delivery workers (each with its own engine) on the test database."""
    started: list[tuple[DeliveryWorker, Store]] = []

    def start(**overrides: Any) -> DeliveryWorker:
        settings = Settings(db_url=migrated_db, **{**FAST, **overrides})
        worker_store = Store(make_engine(migrated_db))
        worker = DeliveryWorker(worker_store, settings)
        worker.start()
        started.append((worker, worker_store))
        return worker

    yield start
    for worker, worker_store in started:
        worker.stop()
        worker_store.engine.dispose()


def _status(store: Store) -> list[tuple[str, int]]:
    return [(row.status, row.attempts) for row in deliveries(store)]


def test_webhook_is_signed_and_delivered_once(store: Store, start_worker: StartWorker) -> None:
    with receiver() as hook:
        add_sink(store, hook.url)
        alert_id = seed_alert(store)
        assert queue(store, alert_id) == 1
        worker = start_worker()
        [got] = hook.wait_for(1)
        assert webhooks.verify(SECRET, got.headers["x-trimtab-timestamp"], got.headers["x-trimtab-signature"], got.body)
        assert not webhooks.verify("another-secret-0123456", got.headers["x-trimtab-timestamp"],
                                   got.headers["x-trimtab-signature"], got.body)  # fmt: skip
        assert got.headers["content-type"] == "application/json"
        assert got.headers["user-agent"].startswith("trimtab/")
        body = got.json()
        row = deliveries(store)[0]
        assert got.headers["x-trimtab-delivery"] == str(row.id) == str(body["delivery_id"])
        assert body["event"] == "firing"
        alert = body["alert"]
        assert alert["id"] == alert_id and alert["rule"] == "nonfinite-loss" and alert["value"] == "NaN"
        assert alert["remedy"] and alert["url"].endswith(f"/runs/{alert['run_id']}")
        wait_until(lambda: _status(store) == [("delivered", 1)], 30, "the delivery recorded")
        # A later alert goes through the same worker; the first is not sent again.
        queue(store, seed_alert(store, run_name="run-b"))
        worker.wake()
        hook.wait_for(2)
        wait_until(lambda: [s for s, _ in _status(store)] == ["delivered", "delivered"], 30, "both recorded")
        assert [r.json()["alert"]["id"] for r in hook.all()].count(alert_id) == 1


def test_slack_message_is_readable(store: Store, start_worker: StartWorker) -> None:
    with receiver() as slack:
        add_sink(store, slack.url, kind="slack")
        alert_id = seed_alert(store, project="llm", run_name="lr-3e-4")
        queue(store, alert_id)
        queue(store, alert_id, "resolved")
        start_worker()
        firing, resolved = (r.json() for r in slack.wait_for(2))
    assert "x-trimtab-signature" not in slack.all()[0].headers
    text = firing["text"]
    assert "CRITICAL" in text and "nonfinite-loss" in text and "llm" in text and "lr-3e-4" in text
    assert "loss = NaN at step 41" in text
    flat = str(firing["blocks"])
    for expected in ("*Project*\\nllm", "*Step*\\n41", "*Value*\\nNaN", "*Baseline*\\n2.5", "What to try", "Lower the"):
        assert expected in flat, expected
    [button] = next(b for b in firing["blocks"] if b["type"] == "actions")["elements"]
    assert button["url"].startswith("http://trimtab.example/runs/")
    assert resolved["text"].startswith(":white_check_mark: RESOLVED nonfinite-loss")
    assert "What to try" not in str(resolved["blocks"])


def test_failing_receiver_is_retried_until_it_answers(store: Store, start_worker: StartWorker) -> None:
    with receiver(lambda n: 500 if n < 3 else OK) as hook:
        add_sink(store, hook.url)
        queue(store, seed_alert(store))
        start_worker()
        hook.wait_for(1)
        wait_until(lambda: _status(store) == [("delivered", 4)], 30, "delivered on the 4th attempt")
        assert [r.answer for r in hook.all()] == [500, 500, 500, OK]
        assert len({r.headers["x-trimtab-delivery"] for r in hook.all()}) == 1  # one delivery, retried
        assert deliveries(store)[0].last_error is None


def test_resolved_never_overtakes_its_firing(store: Store, start_worker: StartWorker) -> None:
    with receiver(lambda n: 503 if n < 2 else OK) as hook:
        add_sink(store, hook.url)
        alert_id = seed_alert(store)
        queue(store, alert_id)
        queue(store, alert_id, "resolved")
        start_worker()
        events = [r.json()["event"] for r in hook.wait_for(2)]
    assert events == ["firing", "resolved"]
    assert [r.json()["event"] for r in hook.all()] == ["firing", "firing", "firing", "resolved"]


def test_hanging_receiver_does_not_delay_another_sink(store: Store, start_worker: StartWorker) -> None:
    with receiver(lambda n: HANG) as stuck, receiver() as healthy:
        add_sink(store, stuck.url)
        add_sink(store, healthy.url)
        for name in ("a", "b", "c"):
            queue(store, seed_alert(store, run_name=name))
        start_worker(delivery_timeout_s=120.0, delivery_per_sink=2)
        healthy.wait_for(3)
        # All three reached the healthy sink while the stuck one still holds its first requests.
        assert len(stuck.all()) <= 2 and all(r.answer == HANG for r in stuck.all())
        states = {(row.sink_id, row.status) for row in deliveries(store)}
        assert {status for _, status in states} == {"pending", "delivered"}


def _claims_in(worker: DeliveryWorker, seconds: float) -> int:
    before = worker.claims
    time.sleep(seconds)
    return worker.claims - before


def test_a_resolved_waiting_behind_a_firing_in_backoff_does_not_spin_the_worker(
    store: Store, start_worker: StartWorker
) -> None:
    with receiver(lambda n: 500) as hook:
        add_sink(store, hook.url)
        alert_id = seed_alert(store)
        queue(store, alert_id)
        queue(store, alert_id, "resolved")
        first = deliveries(store)[0].id
        with store.transaction() as conn:  # the firing failed once and waits an hour; the resolved is due
            conn.execute(
                update(alert_deliveries)
                .where(alert_deliveries.c.id == first)
                .values(attempts=1, next_attempt_at=time.time() + 3600, last_error="HTTP 500")
            )
        worker = start_worker(delivery_poll_s=0.5)
        assert _claims_in(worker, 2.0) < 20  # about one claim per poll, not one per loop
        assert hook.all() == [] and [(row.status, row.attempts) for row in deliveries(store)] == [
            ("pending", 1),
            ("pending", 0),
        ]


def test_a_sink_at_its_in_flight_share_does_not_spin_the_worker(store: Store, start_worker: StartWorker) -> None:
    with receiver(lambda n: HANG) as stuck:
        add_sink(store, stuck.url)
        for name in ("a", "b"):
            queue(store, seed_alert(store, run_name=name))
        worker = start_worker(delivery_per_sink=1, delivery_timeout_s=60.0, delivery_poll_s=0.5)
        stuck.wait_for(1, status=HANG)  # one in flight; the other is due but the sink's share is taken
        assert _claims_in(worker, 2.0) < 20
        assert len(stuck.all()) == 1


@pytest.mark.parametrize("answer", [404, 500, GARBAGE, "refused", HANG], ids=str)
def test_broken_receiver_ends_dead_with_its_error(store: Store, start_worker: StartWorker, answer: int | str) -> None:
    expected = {
        404: "HTTP 404: receiver says no",
        500: "HTTP 500",
        GARBAGE: "RemoteProtocolError",
        "refused": "cannot connect",
        HANG: "no answer within 0.5 s",
    }[answer]
    with receiver(lambda n: answer if isinstance(answer, int) else OK) as hook, receiver() as other:
        url = f"http://127.0.0.1:{free_port()}/hook" if answer == "refused" else hook.url
        add_sink(store, url)
        add_sink(store, other.url)
        queue(store, seed_alert(store))
        start_worker(delivery_max_attempts=3, delivery_timeout_s=0.5)
        other.wait_for(1)  # the other sink is unaffected
        wait_until(lambda: "pending" not in [s for s, _ in _status(store)], 60, "the broken delivery given up")
        broken, fine = deliveries(store)
    assert (broken.status, broken.attempts, fine.status) == ("dead", 3, "delivered")
    assert expected in broken.last_error
    if answer != "refused":
        assert len(hook.all()) == 3


def test_deliveries_older_than_max_age_are_dead(store: Store, start_worker: StartWorker) -> None:
    with receiver(lambda n: 500) as hook:
        add_sink(store, hook.url)
        queue(store, seed_alert(store))
        start_worker(delivery_max_age_s=0.3, delivery_backoff_base_s=0.5, delivery_backoff_cap_s=0.5)
        wait_until(lambda: _status(store)[0][0] == "dead", 60, "the delivery dead")
        assert 1 <= len(hook.all()) == deliveries(store)[0].attempts


def test_enqueue_follows_project_and_enabled(store: Store) -> None:
    add_sink(store, "http://127.0.0.1:9/all")
    add_sink(store, "http://127.0.0.1:9/mine", project="mine")
    add_sink(store, "http://127.0.0.1:9/off", enabled=False)
    add_sink(store, "http://127.0.0.1:9/other", project="other")
    assert queue(store, seed_alert(store, project="mine")) == 2
    assert queue(store, seed_alert(store, project="third")) == 1
    rows = deliveries(store)
    assert all(r.status == "pending" and r.attempts == 0 for r in rows)
    assert rows[0].payload["value"] == "NaN"  # a JSON-safe snapshot
    with pytest.raises(ValueError, match="unknown alert event"):
        queue(store, seed_alert(store), "exploded")


def test_two_workers_on_one_database_never_send_a_row_twice(store: Store, start_worker: StartWorker) -> None:
    n = 120
    with receiver() as a, receiver() as b:
        add_sink(store, a.url)
        add_sink(store, b.url)
        for i in range(n):
            queue(store, seed_alert(store, run_name=f"r{i}"))
        start_worker(delivery_per_sink=8)
        start_worker(delivery_per_sink=8)
        a.wait_for(n)
        b.wait_for(n)
        wait_until(lambda: all(r.status == "delivered" for r in deliveries(store)), 60, "all recorded")
        for hook in (a, b):
            ids = [r.headers["x-trimtab-delivery"] for r in hook.all()]
            assert len(ids) == len(set(ids)) == n
    assert {r.attempts for r in deliveries(store)} == {1}


def test_claim_is_exclusive_between_two_connections(store: Store) -> None:
    """The claiming UPDATE is conditional: a second claimer of the same rows gets nothing."""
    add_sink(store, "http://127.0.0.1:9/x")
    for i in range(5):
        queue(store, seed_alert(store, run_name=f"r{i}"))
    with store.transaction() as first:
        mine = outbox.claim(first, now=1e12, lease_s=60, limit=10, per_sink=10, busy={}, skip_locked=False)
    with store.transaction() as second:
        theirs = outbox.claim(second, now=1e12, lease_s=60, limit=10, per_sink=10, busy={}, skip_locked=False)
    assert len(mine) == 5 and theirs == []
    with store.transaction() as later:  # after the lease, the rows are due again (at-least-once)
        again = outbox.claim(later, now=1e12 + 61, lease_s=60, limit=10, per_sink=10, busy={}, skip_locked=False)
    assert sorted(c.id for c in again) == sorted(c.id for c in mine)
    with store.transaction() as conn:  # the first claimer's lease is gone: its outcome is not recorded
        assert outbox.mark_delivered(conn, mine[0], 1e12) is False
        assert outbox.mark_delivered(conn, again[0], 1e12) is True


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    rng = random.Random(7)
    for attempt in range(1, 30):
        ceiling = min(300.0, 1.0 * 2 ** (attempt - 1))
        waits = [outbox.backoff_s(attempt, 1.0, 300.0, rng) for _ in range(200)]
        assert all(0.0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling * 0.8  # the range is used, up to the cap
    assert outbox.backoff_s(10_000, 1.0, 300.0, rng) <= 300.0
