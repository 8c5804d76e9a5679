"""The ingest writer against a real database: exact values, dedupe by seq, group commit."""

from __future__ import annotations

import math
import struct
import time
from array import array
from collections.abc import Iterator

import pytest

from trimtab.protocol import Batch, Event, Hello, Histogram, RunRef, ScalarSeries
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store
from trimtab.server.ingest import DUPLICATE, STORED, IngestWriter

VALUES = [1.0, math.nan, math.inf, -math.inf, 5e-324, 1 / 3, -1e308, 1.7976931348623157e308]


@pytest.fixture
def store(migrated_db: str) -> Iterator[Store]:
    engine = make_engine(migrated_db)
    yield Store(engine)
    engine.dispose()


@pytest.fixture
def writer(store: Store) -> Iterator[IngestWriter]:
    w = IngestWriter(store)
    w.start()
    yield w
    w.stop()


def _hello(uid: str = "run-a", resume: int = 1, rank: int = 0) -> Hello:
    return Hello(RunRef(uid, "proj", "name"), resume, "0", "host", 1, rank, 1, {})


def _batch(seq: int, start: int, n: int, key: str = "loss") -> Batch:
    steps = array("q", range(start, start + n))
    values = array("d", [VALUES[i % len(VALUES)] for i in range(start, start + n)])
    return Batch(seq, [ScalarSeries(key, steps, array("d", [time.time()] * n), values)])


def test_values_stored_bit_exactly(store: Store, writer: IngestWriter) -> None:
    run_id, acked = store.open_run(_hello())
    assert acked == 0
    assert writer.submit(run_id, 0, _batch(1, 0, len(VALUES))).result(30) == STORED
    rows = store.scalar_rows(run_id, "loss", None, None)
    assert rows.steps == list(range(len(VALUES)))
    assert [struct.pack("<d", v) for v in rows.values] == [struct.pack("<d", v) for v in VALUES]


def test_resent_seq_is_acked_again_but_stored_once(store: Store, writer: IngestWriter) -> None:
    run_id, _ = store.open_run(_hello())
    futures = [writer.submit(run_id, 0, _batch(seq, (seq - 1) * 10, 10)) for seq in (1, 2, 2, 3)]
    assert [f.result(30) for f in futures] == [STORED, STORED, DUPLICATE, STORED]
    assert writer.submit(run_id, 0, _batch(1, 0, 10)).result(30) == DUPLICATE
    assert store.get_run(run_id)["n_points"] == 30
    assert store.scalar_rows(run_id, "loss", None, None).steps == list(range(30))


def test_ranks_have_their_own_seq_space(store: Store, writer: IngestWriter) -> None:
    run_id, _ = store.open_run(_hello())
    assert writer.submit(run_id, 0, _batch(1, 0, 5)).result(30) == STORED
    assert writer.submit(run_id, 1, _batch(1, 0, 5, key="loss_rank1")).result(30) == STORED


def test_ranks_in_one_group_commit_get_their_own_keys(store: Store) -> None:
    run_id, _ = store.open_run(_hello())
    writer = IngestWriter(store)
    futures = [writer.submit(run_id, rank, _batch(1, rank * 100, 3)) for rank in (0, 1, 0, 2)]
    futures.append(writer.submit(run_id, 1, _batch(2, 500, 2)))
    writer.start()  # all queued first, so they form one group commit and share the key cache
    try:
        assert [f.result(30) for f in futures] == [STORED, STORED, DUPLICATE, STORED, STORED]
    finally:
        writer.stop()
    assert store.scalar_rows(run_id, "loss", None, None).steps == [0, 1, 2]
    assert store.scalar_rows(run_id, "loss", None, None, rank=1).steps == [100, 101, 102, 500, 501]
    assert store.scalar_rows(run_id, "loss", None, None, rank=2).steps == [200, 201, 202]
    assert [(k["rank"], k["count"]) for k in store.list_keys(run_id)] == [(0, 3), (1, 5), (2, 3)]
    assert [k["rank"] for k in store.list_keys(run_id, rank=2)] == [2]


def test_welcome_acks_the_contiguous_stored_prefix(store: Store, writer: IngestWriter) -> None:
    run_id, _ = store.open_run(_hello())
    for seq in (1, 2, 3, 5):
        writer.submit(run_id, 0, _batch(seq, seq * 10, 10)).result(30)
    assert store.open_run(_hello(resume=1)) == (run_id, 3)
    assert store.open_run(_hello(resume=4)) == (run_id, 3)
    assert store.open_run(_hello(resume=5)) == (run_id, 5)
    assert store.open_run(_hello(resume=9)) == (run_id, 8)


def test_histograms_and_events_are_stored_and_counted(store: Store, writer: IngestWriter) -> None:
    run_id, _ = store.open_run(_hello())
    hist = Histogram("weights/w", 3, 1.0, array("d", [0.0, 0.5, 1.0]), array("q", [4, 6]), 1, 0, 2)
    event = Event("nan", 3, 1.0, "error", {"module": "fc1"})
    assert writer.submit(run_id, 0, Batch(1, [], [hist], [event])).result(30) == STORED
    run = store.get_run(run_id)
    assert (run["n_histograms"], run["n_events"]) == (1, 1)
    assert store.list_keys(run_id) == [{"key": "weights/w", "kind": "histogram", "rank": 0, "count": 1, "last_step": 3}]


def test_bye_marks_finished_and_heartbeat_stores_drops(store: Store) -> None:
    run_id, _ = store.open_run(_hello())
    store.touch_run(run_id, 0, {"queue_full": 2})
    assert store.get_run(run_id)["drops"] == {"queue_full": 2}
    store.finish_run(run_id, 0, {})
    assert store.get_run(run_id)["status"] == "finished"


def test_silent_run_reads_as_stale_not_crashed(store: Store) -> None:
    run_id, _ = store.open_run(_hello())
    store.stale_after_s = 0.0
    time.sleep(0.01)
    assert store.get_run(run_id)["status"] == "stale"
    store.open_run(_hello())  # the agent reconnects
    store.stale_after_s = 60.0
    assert store.get_run(run_id)["status"] == "running"


def test_open_run_in_another_project_is_a_conflict(store: Store) -> None:
    from trimtab.errors import TrimtabError

    store.open_run(_hello())
    with pytest.raises(TrimtabError) as info:
        store.open_run(Hello(RunRef("run-a", "other", None), 1, "0", "h", 1, 0, 1, {}))
    assert info.value.code.value == "run_conflict"


def test_a_batch_the_database_refuses_does_not_fail_its_group(store: Store) -> None:
    from trimtab.errors import ErrorCode
    from trimtab.protocol import ProtocolError

    run_id, _ = store.open_run(_hello())
    writer = IngestWriter(store)
    # Built directly, past protocol validation: bytes cannot go into a JSON column.
    poison = Batch(2, [], [], [Event("x", 1, 1.0, "info", {"raw": b"\x00"})])
    futures = [writer.submit(run_id, 0, b) for b in (_batch(1, 0, 5), poison, _batch(3, 5, 5))]
    writer.start()  # all three are queued, so they form one group commit
    try:
        assert futures[0].result(30) == STORED
        assert futures[2].result(30) == STORED
        with pytest.raises(ProtocolError) as info:
            futures[1].result(30)
        assert (info.value.code, info.value.seq) == (ErrorCode.INVALID_BATCH, 2)
    finally:
        writer.stop()
    assert store.scalar_rows(run_id, "loss", None, None).steps == list(range(10))
