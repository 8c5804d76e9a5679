"""One run, several ranks: every rank of a multi-process job says hello with the same run uid
and its own rank, over its own real websocket."""

from __future__ import annotations

from tests.helpers import ServerProcess
from tests.server.wire import WireAgent, histogram, scalars
from trimtab import protocol
from trimtab.server.db.store import merge_drops


def test_ranks_logging_the_same_key_get_separate_series(server: ServerProcess) -> None:
    with WireAgent(server, "ddp", rank=0, world_size=2) as rank0, WireAgent(server, "ddp", 1, 2) as rank1:
        assert rank0.run_id == rank1.run_id
        # the same seq on both ranks: each rank has its own seq space
        rank0.store(1, scalars=[scalars("loss", [0, 1, 2], [1.0, 0.5, 0.25])])
        rank1.store(1, scalars=[scalars("loss", [0, 1], [9.0, 8.0])])
        rank1.store(2, histograms=[histogram("w", 1, [0.0, 1.0], [11])])
        rank0.store(2, histograms=[histogram("w", 1, [0.0, 2.0], [22]), histogram("w", 2, [0.0, 2.0], [23])])
        rank1.store(3, events=[protocol.event_entry("nan", 1, 1.7e9, {"on": "rank1"})])
        run_id = rank0.run_id

    base = f"/api/v1/runs/{run_id}"
    loss0 = server.get(f"{base}/scalars?key=loss")
    assert (loss0["rank"], loss0["steps"], loss0["values"]) == (0, [0, 1, 2], [1.0, 0.5, 0.25])
    assert server.get(f"{base}/scalars?key=loss&rank=0") == loss0
    loss1 = server.get(f"{base}/scalars?key=loss&rank=1")
    assert (loss1["rank"], loss1["steps"], loss1["values"]) == (1, [0, 1], [9.0, 8.0])
    w0 = server.get(f"{base}/histograms?key=w")
    assert w0["rank"] == 0 and [h["counts"] for h in w0["histograms"]] == [[22], [23]]
    w1 = server.get(f"{base}/histograms?key=w&rank=1")
    assert w1["rank"] == 1 and [(h["edges"], h["counts"]) for h in w1["histograms"]] == [([0.0, 1.0], [11])]
    assert server.get(f"{base}/keys") == [
        {"key": "w", "kind": "histogram", "rank": 0, "count": 2, "last_step": 2},
        {"key": "w", "kind": "histogram", "rank": 1, "count": 1, "last_step": 1},
        {"key": "loss", "kind": "scalar", "rank": 0, "count": 3, "last_step": 2},
        {"key": "loss", "kind": "scalar", "rank": 1, "count": 2, "last_step": 1},
    ]
    assert [k["key"] for k in server.get(f"{base}/keys?rank=1")] == ["w", "loss"]
    assert [(e["rank"], e["data"]) for e in server.get(f"{base}/events")] == [(1, {"on": "rank1"})]
    run = server.get(base)
    assert (run["n_points"], run["n_histograms"], run["n_events"], run["world_size"]) == (5, 3, 1, 2)
    assert len(server.get("/api/v1/runs")) == 1


def test_world_size_is_the_largest_any_rank_reported(server: ServerProcess) -> None:
    with WireAgent(server, "grow", rank=0, world_size=2) as rank0:
        with WireAgent(server, "grow", rank=3, world_size=4) as rank3:
            assert rank3.run_id == rank0.run_id  # another rank is never a run conflict
        with WireAgent(server, "grow", rank=1, world_size=2) as rank1:
            assert rank1.run_id == rank0.run_id
        assert server.get(f"/api/v1/runs/{rank0.run_id}")["world_size"] == 4
    with WireAgent(server, "grow", rank=1, world_size=2, project="elsewhere") as other_project:
        assert other_project.reply["code"] == "run_conflict"  # the uid still names one run


def test_only_rank_0_bye_finishes_the_run_and_drops_are_kept_per_rank(server: ServerProcess) -> None:
    with WireAgent(server, "lifecycle", rank=0, world_size=2) as rank0, WireAgent(server, "lifecycle", 1, 2) as rank1:
        _bye_lifecycle(server, rank0, rank1)


def _bye_lifecycle(server: ServerProcess, rank0: WireAgent, rank1: WireAgent) -> None:
    path = f"/api/v1/runs/{rank0.run_id}"
    rank0.heartbeat({"bad_value": 1}, then_seq=1)
    rank1.heartbeat({"queue_full": 2}, then_seq=1)
    assert server.get(path)["drops"] == {"bad_value": 1, "rank1/queue_full": 2}

    assert rank1.bye({"queue_full": 3, "bad_key": 1}) == 1000
    run = server.get(path)
    assert (run["status"], run["finished_at"]) == ("running", None)
    assert run["drops"] == {"bad_value": 1, "rank1/queue_full": 3, "rank1/bad_key": 1}

    rank0.heartbeat({"bad_value": 4}, then_seq=2)  # rank 0's counts replace only rank 0's
    assert server.get(path)["drops"] == {"bad_value": 4, "rank1/queue_full": 3, "rank1/bad_key": 1}
    assert rank0.bye({"bad_value": 5}) == 1000
    run = server.get(path)
    assert run["status"] == "finished" and run["finished_at"] is not None
    assert run["drops"] == {"bad_value": 5, "rank1/queue_full": 3, "rank1/bad_key": 1}

    # a late rank reconnecting does not make the finished run look alive again; rank 0 does
    assert rank1.connect()["t"] == "welcome"
    assert server.get(path)["status"] == "finished"
    assert rank1.bye() == 1000
    assert rank0.connect()["t"] == "welcome"
    assert server.get(path)["status"] == "running"
    assert rank0.bye() == 1000
    assert server.get(path)["status"] == "finished"


def test_merge_drops_replaces_only_the_reporting_ranks_counts() -> None:
    current = {"queue_full": 1, "rank1/bad_key": 2, "rank12/bad_key": 3}
    assert merge_drops(current, 0, {"bad_value": 4}) == {"bad_value": 4, "rank1/bad_key": 2, "rank12/bad_key": 3}
    assert merge_drops(current, 1, {"queue_full": 5}) == {
        "queue_full": 1,
        "rank1/queue_full": 5,
        "rank12/bad_key": 3,
    }
    assert merge_drops(current, 12, {}) == {"queue_full": 1, "rank1/bad_key": 2}
    assert merge_drops({}, 0, {}) == {}
