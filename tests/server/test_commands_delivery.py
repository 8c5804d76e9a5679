"""Commands over the agent socket of a real server, with a hand-driven agent speaking the wire
protocol: pushed to every live rank, sent on reconnect, swept in from another replica,
expired; agents' results move the status (rank 0 decides); autopilot reports are recorded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerProcess, recv_frame, wait_until
from tests.server.test_commands_api import call, post
from tests.server.wire import WireAgent, scalars
from trimtab import protocol


def frame(agent: WireAgent) -> dict[str, Any]:
    assert agent.ws is not None
    return recv_frame(agent.ws)


def result(agent: WireAgent, ident: str, status: str, step: int | None = None, detail: Any = None) -> None:
    assert agent.ws is not None
    agent.ws.send(protocol.encode(protocol.cmd_result_frame(ident, status, step, detail)))


class Barrier:
    """Frames of a connection are handled in order: once a batch sent after some results is
    acked, the server has recorded those results."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, agent: WireAgent) -> None:
        self.seq += 1
        agent.store(self.seq, scalars=[scalars("loss", [self.seq], [1.0])])


def command(server: ServerProcess, run_id: int, ident: str) -> dict[str, Any]:
    status, body = call(server, "GET", f"/api/v1/runs/{run_id}/commands/{ident}")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def send(server: ServerProcess, run_id: int, body: dict[str, Any]) -> dict[str, Any]:
    status, sent = post(server, run_id, body)
    assert status == 201, sent
    return sent  # type: ignore[no-any-return]


def cmd(ident: str, kind: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"t": "cmd", "id": ident, "kind": kind, "args": args}


def test_a_command_goes_at_once_to_every_rank_and_not_to_a_replay(server: ServerProcess) -> None:
    with (
        WireAgent(server, "ddp", rank=0, world_size=2) as rank0,
        WireAgent(server, "ddp", rank=1, world_size=2) as rank1,
        WireAgent(server, "ddp", rank=0, world_size=2) as replay,
    ):
        replay.connect(replay=True)  # an orphaned spool's replay applies no commands
        run_id = rank0.run_id
        assert rank1.run_id == replay.run_id == run_id
        send(server, run_id, {"id": "lr-1", "kind": "reduce_lr", "args": {"factor": 0.1}})
        assert frame(rank0) == frame(rank1) == cmd("lr-1", "reduce_lr", {"factor": 0.1})
        send(server, run_id, {"id": "mine-1", "kind": "dump.stats", "args": {"deep": {"x": [1, None]}}})
        assert frame(rank0) == frame(rank1) == cmd("mine-1", "dump.stats", {"deep": {"x": [1, None]}})
        # the replay got nothing: the next frame on it is the ack of its own batch
        assert replay.ws is not None
        replay.ws.send(protocol.encode(protocol.batch_frame(1, [])))
        assert frame(replay) == {"t": "ack", "seq": 1}


def test_results_move_the_status_and_rank_0_decides(server: ServerProcess) -> None:
    barrier = Barrier()
    with WireAgent(server, "res", rank=0, world_size=2) as rank0, WireAgent(server, "res", 1, 2) as rank1:
        run_id = rank0.run_id
        send(server, run_id, {"id": "a", "kind": "reduce_lr", "args": {"factor": 0.5}})
        send(server, run_id, {"id": "b", "kind": "mine", "args": {}})
        for agent in (rank0, rank1):
            assert [frame(agent)["id"], frame(agent)["id"]] == ["a", "b"]

        # rank 1 is fast: its results are kept per rank, the command's status waits for rank 0
        result(rank1, "a", "delivered")
        result(rank1, "a", "applied", 41, {"before": [0.1], "after": [0.05]})
        barrier(rank1)
        a = command(server, run_id, "a")
        assert (a["status"], a["delivered_at"], a["step"]) == ("pending", None, None)
        assert a["ranks"] == {"1": {"status": "applied", "step": 41, "detail": {"before": [0.1], "after": [0.05]}}}

        result(rank0, "a", "delivered")
        barrier(rank0)
        a = command(server, run_id, "a")
        assert a["status"] == "delivered" and a["delivered_at"] is not None and a["finished_at"] is None
        assert a["ranks"]["0"] == {"status": "delivered", "step": None, "detail": None}

        detail = {"factor": 0.5, "before": [0.1], "after": [0.05], "odd": float("nan")}
        result(rank0, "a", "applied", 41, detail)
        barrier(rank0)
        a = command(server, run_id, "a")
        assert (a["status"], a["step"]) == ("applied", 41) and a["finished_at"] is not None
        stored = {"factor": 0.5, "before": [0.1], "after": [0.05], "odd": "NaN"}  # NaN is not JSON
        assert a["detail"] == stored
        assert a["ranks"]["0"] == {"status": "applied", "step": 41, "detail": stored}

        # final is final: a duplicate, a contradiction and a late 'delivered' change nothing
        result(rank0, "a", "applied", 41, detail)
        result(rank0, "a", "rejected", 42, {"reason": "changed my mind"})
        result(rank0, "a", "delivered")
        result(rank1, "a", "rejected", 43, {"reason": "no"})
        barrier(rank0)
        barrier(rank1)
        assert command(server, run_id, "a") == a

        # a rejection carries the agent's reason; unknown ids and statuses are ignored, the
        # connection stays open
        result(rank0, "b", "rejected", 44, {"reason": "no handler for command 'mine'"})
        result(rank0, "no-such-command", "applied", 44, {})
        result(rank0, "b", "exploded", 44, {})
        result(rank0, "x" * 100, "applied", 44, {})
        barrier(rank0)
        b = command(server, run_id, "b")
        assert (b["status"], b["step"], b["detail"]) == ("rejected", 44, {"reason": "no handler for command 'mine'"})
        assert b["delivered_at"] is not None  # rank 0 skipped 'delivered': it got it all the same
        assert set(b["ranks"]) == {"0"}
        status, listed = call(server, "GET", f"/api/v1/runs/{run_id}/commands")
        assert status == 200 and [c["id"] for c in listed] == ["a", "b"]


def test_an_offline_agent_gets_open_commands_oldest_first_when_it_reconnects(server: ServerProcess) -> None:
    barrier = Barrier()
    agent = WireAgent(server, "offline")
    with agent:
        run_id = agent.run_id
        send(server, run_id, {"id": "done", "kind": "checkpoint"})
        send(server, run_id, {"id": "half", "kind": "pause"})
        assert [frame(agent)["id"], frame(agent)["id"]] == ["done", "half"]
        result(agent, "done", "applied", 3, {})
        result(agent, "half", "delivered")  # then the connection drops before it is applied
        barrier(agent)
    # the agent is away: these wait for it
    send(server, run_id, {"id": "first", "kind": "skip_batches", "args": {"n": 2}})
    send(server, run_id, {"id": "second", "kind": "resume"})
    assert command(server, run_id, "first")["status"] == "pending"

    with WireAgent(server, "offline") as again:
        assert again.run_id == run_id
        # after the welcome: what has no final result yet, oldest first; never 'done' again
        assert [frame(again) for _ in range(3)] == [
            cmd("half", "pause", {}),
            cmd("first", "skip_batches", {"n": 2}),
            cmd("second", "resume", {}),
        ]
        result(again, "half", "applied", 9, {"paused": True})
        barrier(again)
        third = send(server, run_id, {"id": "third", "kind": "stop"})
        assert frame(again) == cmd("third", "stop", {})
        assert third["status"] == "pending"
    assert command(server, run_id, "half")["status"] == "applied"


@pytest.fixture
def fast_sweep_server(migrated_db: str, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(migrated_db, tmp_path / "server.log")
    proc.env["TRIMTAB_COMMAND_SWEEP_S"] = "0.2"
    proc.start()
    yield proc
    proc.stop()


def test_commands_expire_pending_or_delivered_and_are_not_sent_after(fast_sweep_server: ServerProcess) -> None:
    server, barrier = fast_sweep_server, Barrier()
    with WireAgent(server, "expiry") as agent:
        run_id = agent.run_id
        send(server, run_id, {"id": "slow", "kind": "pause", "expires_in_s": 0.5})
        assert frame(agent)["id"] == "slow"
        result(agent, "slow", "delivered")
        barrier(agent)
        wait_until(lambda: command(server, run_id, "slow")["status"] == "expired", 30, "the delivered one to expire")
        slow = command(server, run_id, "slow")
        assert slow["delivered_at"] is not None and slow["finished_at"] is not None and slow["step"] is None
        assert "expired" in slow["detail"]["reason"]
        # the agent applies it after all: its rank's entry says so, the status stays expired
        result(agent, "slow", "applied", 12, {"paused": True})
        barrier(agent)
        late = command(server, run_id, "slow")
        assert late["status"] == "expired" and late["ranks"]["0"]["status"] == "applied"

    send(server, run_id, {"id": "stale", "kind": "stop", "expires_in_s": 0.5})
    wait_until(lambda: command(server, run_id, "stale")["status"] == "expired", 30, "the pending command to expire")
    send(server, run_id, {"id": "fresh", "kind": "checkpoint"})
    with WireAgent(server, "expiry") as again:
        assert frame(again) == cmd("fresh", "checkpoint", {})  # not the expired ones before it
    status, expired = call(server, "GET", f"/api/v1/runs/{run_id}/commands?status=expired")
    assert status == 200 and [c["id"] for c in expired] == ["slow", "stale"]


def test_a_command_sent_through_another_replica_reaches_the_agent(server: ServerProcess, tmp_path: Path) -> None:
    barrier = Barrier()
    other = ServerProcess(server.db_url, tmp_path / "other.log")
    other.start()
    try:
        with WireAgent(server, "replicas") as agent:
            run_id = agent.run_id
            sent = send(other, run_id, {"id": "elsewhere", "kind": "set_lr", "args": {"lr": 0.01}})
            assert sent["status"] == "pending"
            # the replica holding the socket finds it in its sweep
            assert frame(agent) == cmd("elsewhere", "set_lr", {"lr": 0.01})
            result(agent, "elsewhere", "applied", 5, {"before": [0.1], "after": [0.01]})
            barrier(agent)
            seen = command(other, run_id, "elsewhere")
            assert (seen["status"], seen["step"]) == ("applied", 5)
            # later sweeps do not send it to that connection again: the next frame is a new one
            send(other, run_id, {"id": "elsewhere-2", "kind": "checkpoint"})
            assert frame(agent)["id"] == "elsewhere-2"
    finally:
        other.stop()


def test_autopilot_actions_are_recorded_as_commands(server: ServerProcess) -> None:
    barrier = Barrier()
    with WireAgent(server, "auto") as agent:
        run_id = agent.run_id
        detail = {
            "source": "autopilot",
            "kind": "reduce_lr",
            "args": {"factor": 0.5, "min_lr": 0.0},
            "reason": "3 instabilities within 100 steps",
            "before": [0.1],
            "after": [0.05],
        }
        result(agent, "auto-1", "applied", 120, detail)
        result(agent, "auto-1", "applied", 120, detail)  # resent after a reconnect: one row
        skip = {"source": "autopilot", "kind": "skip_batches", "args": {"n": 1}, "reason": "non-finite loss"}
        result(agent, "auto-2", "applied", 130, skip)
        # not recordable: 'delivered' for an action, no kind, and an unknown id of a human command
        result(agent, "auto-3", "delivered", 131, {"source": "autopilot", "kind": "pause", "args": {}})
        result(agent, "auto-4", "applied", 131, {"source": "autopilot", "args": {}})
        result(agent, "human-1", "applied", 131, {"kind": "pause"})
        barrier(agent)
        human = send(server, run_id, {"id": "human-2", "kind": "pause"})
        assert frame(agent)["id"] == "human-2"  # an autopilot row is never sent to the agent

    auto = command(server, run_id, "auto-1")
    assert {k: auto[k] for k in ("kind", "args", "status", "source", "created_by", "step", "detail")} == {
        "kind": "reduce_lr",
        "args": {"factor": 0.5, "min_lr": 0.0},
        "status": "applied",
        "source": "autopilot",
        "created_by": "autopilot",
        "step": 120,
        "detail": detail,
    }
    assert auto["ranks"] == {"0": {"status": "applied", "step": 120, "detail": detail}}
    assert auto["finished_at"] is not None

    base = f"/api/v1/runs/{run_id}/commands"
    assert [c["id"] for c in call(server, "GET", base)[1]] == ["auto-1", "auto-2", "human-2"]
    assert [c["id"] for c in call(server, "GET", f"{base}?source=autopilot")[1]] == ["auto-1", "auto-2"]
    assert call(server, "GET", f"{base}?source=human")[1] == [human]
    for missing in ("auto-3", "auto-4", "human-1"):
        assert call(server, "GET", f"{base}/{missing}")[0] == 404


def test_the_listing_is_in_creation_order_with_filters_and_pages(server: ServerProcess) -> None:
    barrier = Barrier()
    with WireAgent(server, "list") as agent:
        run_id = agent.run_id
        ids = [f"c{i}" for i in range(7)]
        for ident in ids:
            send(server, run_id, {"id": ident, "kind": "checkpoint"})
        assert [frame(agent)["id"] for _ in ids] == ids
        result(agent, "c1", "applied", 1, {})
        result(agent, "c2", "rejected", 2, {"reason": "no checkpoint handler"})
        result(agent, "c4", "delivered")
        barrier(agent)

    base = f"/api/v1/runs/{run_id}/commands"

    def listed(query: str) -> list[str]:
        status, body = call(server, "GET", f"{base}?{query}")
        assert status == 200, body
        return [c["id"] for c in body]

    assert listed("") == ids
    assert listed("order=newest") == ids[::-1]
    assert listed("status=pending") == ["c0", "c3", "c5", "c6"]
    assert listed("status=applied") == ["c1"] and listed("status=rejected") == ["c2"]
    assert listed("status=delivered") == ["c4"] and listed("status=expired") == []
    assert listed("limit=3") == ["c0", "c1", "c2"]
    assert listed("limit=3&after=c2") == ["c3", "c4", "c5"]
    assert listed("limit=3&after=c5") == ["c6"]
    assert listed("after=c6") == []
    assert listed("order=newest&limit=2&after=c4") == ["c3", "c2"]
    assert listed("status=pending&after=c3") == ["c5", "c6"]
    for bad in ("status=done", "source=robot", "limit=0", "limit=1001", "order=random", "after=nope"):
        status, body = call(server, "GET", f"{base}?{bad}")
        assert (status, body["error"]["code"]) == (422, "invalid_request"), bad


def test_ranks_answering_at_the_same_time_each_keep_their_entry(server: ServerProcess) -> None:
    barrier = Barrier()
    with WireAgent(server, "race", rank=0, world_size=2) as rank0, WireAgent(server, "race", 1, 2) as rank1:
        run_id = rank0.run_id
        ids = [f"r{i}" for i in range(30)]
        for ident in ids:
            send(server, run_id, {"id": ident, "kind": "checkpoint"})
        for agent in (rank0, rank1):
            assert [frame(agent)["id"] for _ in ids] == ids
        for ident in ids:  # both connections' results are recorded concurrently, row by row
            for agent, step in ((rank0, 10), (rank1, 11)):
                result(agent, ident, "delivered")
                result(agent, ident, "applied", step, {"rank": agent.rank})
        barrier(rank0)
        barrier(rank1)
    status, listed = call(server, "GET", f"/api/v1/runs/{run_id}/commands?limit=1000")
    assert status == 200
    assert [(c["id"], c["status"], c["step"]) for c in listed] == [(i, "applied", 10) for i in ids]
    for c in listed:
        assert c["ranks"] == {
            "0": {"status": "applied", "step": 10, "detail": {"rank": 0}},
            "1": {"status": "applied", "step": 11, "detail": {"rank": 1}},
        }, c["id"]
