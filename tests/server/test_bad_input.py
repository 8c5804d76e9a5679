"""Bad input over a real socket and real HTTP: a clear code, a log line, and nothing lost for
anyone else. A well-behaved agent streams alongside the abuse and must arrive intact."""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

import trimtab
from tests.helpers import ServerProcess, api_status, assert_exact_series, recv_frame, value_for
from trimtab import protocol


def _ws(server: ServerProcess, headers: dict[str, str] | None = None) -> ClientConnection:
    url = server.url.replace("http://", "ws://") + protocol.WS_PATH
    return connect(url, additional_headers=headers, compression=None, max_size=None, open_timeout=10)


def _hello(uid: str = "bad-actor", **overrides: Any) -> bytes:
    frame = protocol.hello_frame(
        uid=uid, project="abuse", name=uid, resume_from_seq=1, agent_version="x", host="h", pid=1
    )
    frame.update(overrides)
    return protocol.encode(frame)


def _error_and_close(ws: ClientConnection) -> tuple[dict[str, Any], int | None]:
    """The error frame the server sends, and the close code that follows it."""
    frame = recv_frame(ws)
    try:
        ws.recv(timeout=10)
        raise AssertionError("the server kept the connection open")
    except ConnectionClosed as closed:
        return frame, closed.rcvd.code if closed.rcvd else None


@pytest.fixture
def good_agent(server: ServerProcess, tmp_path: Any) -> Iterator[Callable[[], None]]:
    """A normal run streaming in a thread while a test misbehaves; call the result to check it."""
    run = trimtab.init(
        server=server.url,
        project="good",
        name="good",
        spool_dir=str(tmp_path / "spool"),
        replay_orphans=False,
        flush_interval=0.02,
    )
    stop = threading.Event()

    def train() -> None:
        for step in range(3000):
            run.log({"loss": value_for("loss", step)}, step=step)
            if step % 100 == 0:
                stop.wait(0.01)

    thread = threading.Thread(target=train)
    thread.start()

    def check() -> None:
        thread.join()
        assert run.finish(timeout=30) is True
        assert run.id is not None
        assert_exact_series(server, run.id, "loss", range(3000))

    yield check
    stop.set()
    thread.join()


# case -> (valid hello first?, bad frame, expected code, expected close code)
CASES: dict[str, tuple[bool, bytes | str, str, int]] = {
    "malformed msgpack": (False, b"\xc1\xc1", "bad_frame", 1007),
    "text frame": (False, "hello", "bad_frame", 1007),
    "unknown frame type": (False, msgpack.packb({"t": "launch"}), "unknown_frame", 1003),
    "future protocol version": (False, _hello(v=2), "unsupported_version", 4426),
    "batch before hello": (False, protocol.encode(protocol.batch_frame(1, [])), "hello_expected", 4400),
    "wrong types in hello": (False, _hello(run={"uid": 1, "project": []}), "bad_frame", 1007),
    "second hello": (True, _hello(), "bad_frame", 1007),
    "malformed after hello": (True, b"\xc1", "bad_frame", 1007),
    "rank beyond int32": (False, _hello(rank=2**40), "bad_frame", 1007),
    "seq beyond int64": (True, msgpack.packb({"t": "batch", "seq": 2**64 - 1}), "bad_frame", 1007),
    "NUL in the run uid": (False, _hello(run={"uid": "a\x00b", "project": "p"}), "bad_frame", 1007),
    "replay not a boolean": (False, _hello(replay="false"), "bad_frame", 1007),
    "non-finite config": (False, _hello(config={"lr": float("nan")}), "bad_frame", 1007),
    "frame over the size limit": (True, b"\x80" + b"\0" * (protocol.MAX_FRAME_BYTES + 10), "frame_too_large", 1009),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_frames_get_error_frame_and_close_code(
    server: ServerProcess, good_agent: Callable[[], None], case: str
) -> None:
    hello_first, frame, code, close_code = CASES[case]
    with _ws(server) as ws:
        if hello_first:
            ws.send(_hello())
            assert recv_frame(ws)["t"] == "welcome"
        ws.send(frame)
        error, closed_with = _error_and_close(ws)
    assert error["t"] == "error" and error["code"] == code and error["message"]
    assert closed_with == close_code
    good_agent()
    assert code in server.log(), "every rejection is logged"


def test_missing_hello_times_out_with_a_code(server: ServerProcess) -> None:
    server_settings_timeout = 10.0  # Settings.hello_timeout_s default
    with _ws(server) as ws:
        frame = recv_frame(ws, server_settings_timeout + 10)
    assert frame["code"] == "hello_expected"


def test_invalid_batch_is_rejected_alone_and_the_connection_goes_on(server: ServerProcess) -> None:
    with _ws(server) as ws:
        ws.send(_hello(uid="half-bad"))
        welcome = recv_frame(ws)
        ws.send(protocol.encode({"t": "batch", "seq": 1, "scalars": [{"k": "x", "steps": b"\0" * 3}]}))
        error = recv_frame(ws)
        assert (error["t"], error["code"], error["seq"]) == ("error", "invalid_batch", 1)
        good = protocol.scalar_series("x", array("q", [5]), array("d", [1.0]), array("d", [2.0]))
        ws.send(protocol.encode(protocol.batch_frame(2, [good])))
        assert recv_frame(ws) == {"t": "ack", "seq": 2}
    run = server.get(f"/api/v1/runs/{welcome['run_id']}")
    assert run["n_points"] == 1


def test_bad_histograms_are_rejected_alone_over_the_socket(
    server: ServerProcess, good_agent: Callable[[], None]
) -> None:
    def entry(edges: list[float], counts: list[int], step: int = 1, **extra: int) -> dict[str, Any]:
        return protocol.histogram_entry("w", step, 1.0, array("d", edges), array("q", counts), **extra)

    bad = [
        (entry([0.0, float("nan")], [1]), "edges must be finite"),
        (entry([0.0, float("inf")], [1]), "edges must be finite"),
        (entry([1.0, 0.0], [1]), "edges must be non-decreasing"),
        (entry([float(i) for i in range(4098)], [0] * 4097), "at most 4096"),
        (entry([0.0, 1.0], [-3]), "bin counts must be >= 0"),
        (entry([0.0, 1.0], [1], nan=-1), "'nan' must be >= 0"),
        (entry([0.0, 1.0], [1], pinf=-1), "'pinf' must be >= 0"),
        (entry([0.0, 1.0], [1], ninf=-1), "'ninf' must be >= 0"),
    ]
    # a second connection in the middle of the abuse must not notice it
    with _ws(server) as ws, _ws(server) as bystander:
        ws.send(_hello(uid="bad-hist"))
        welcome = recv_frame(ws)
        bystander.send(_hello(uid="bystander"))
        bystander_run = recv_frame(bystander)["run_id"]
        for seq, (histogram, why) in enumerate(bad, start=1):
            ws.send(protocol.encode(protocol.batch_frame(seq, [], [histogram])))
            error = recv_frame(ws)
            assert (error["t"], error["code"], error["seq"]) == ("error", "invalid_batch", seq)
            assert why in error["message"] and "'w'" in error["message"], error["message"]
            bystander.send(protocol.encode(protocol.batch_frame(seq, [], [entry([0.0, 1.0], [seq], step=seq)])))
            assert recv_frame(bystander) == {"t": "ack", "seq": seq}
        ws.send(protocol.encode(protocol.batch_frame(99, [], [entry([0.0, 0.5, 1.0], [2, 3], nan=1)])))
        assert recv_frame(ws) == {"t": "ack", "seq": 99}  # the connection goes on
    stored = server.get(f"/api/v1/runs/{welcome['run_id']}/histograms?key=w")["histograms"]
    assert [(h["edges"], h["counts"], h["nan"]) for h in stored] == [([0.0, 0.5, 1.0], [2, 3], 1)]
    assert server.get(f"/api/v1/runs/{welcome['run_id']}")["n_histograms"] == 1
    others = server.get(f"/api/v1/runs/{bystander_run}/histograms?key=w")["histograms"]
    assert [h["counts"] for h in others] == [[seq] for seq in range(1, len(bad) + 1)]
    good_agent()
    assert "rejected batch 8: batch 8: histogram 'w': 'ninf' must be >= 0" in server.log(), "every rejection is logged"


def test_rest_errors_have_codes(server: ServerProcess) -> None:
    status, body = api_status(server.url + "/api/v1/runs/424242")
    assert (status, body["error"]["code"]) == (404, "run_not_found")
    status, body = api_status(server.url + "/api/v1/runs/not-a-number")
    assert (status, body["error"]["code"]) == (422, "invalid_request")
    status, body = api_status(server.url + "/api/v1/runs?limit=0")
    assert (status, body["error"]["code"]) == (422, "invalid_request")
    assert "limit" in body["error"]["message"]
    status, body = api_status(server.url + "/api/v1/runs/99999999999999999999")
    assert (status, body["error"]["code"]) == (422, "invalid_request")
    status, body = api_status(server.url + "/api/v1/runs?offset=9223372036854775808")
    assert (status, body["error"]["code"]) == (422, "invalid_request")
    status, body = api_status(server.url + "/api/v1/runs?project=a%00b")
    assert (status, body["error"]["code"]) == (422, "invalid_request")
    status, body = api_status(server.url + "/api/v1/nope")
    assert (status, body["error"]["code"]) == (404, "not_found")


def test_scalars_for_unknown_key_and_bad_max_points(server: ServerProcess, tmp_path: Any) -> None:
    with trimtab.init(server=server.url, name="k", spool_dir=str(tmp_path), replay_orphans=False) as run:
        run.log({"loss": 1.0}, step=0)
    status, body = api_status(server.url + f"/api/v1/runs/{run.id}/scalars?key=missing")
    assert (status, body["error"]["code"]) == (404, "key_not_found")
    status, body = api_status(server.url + f"/api/v1/runs/{run.id}/scalars?key=loss&max_points=1")
    assert (status, body["error"]["code"]) == (422, "invalid_request")
    status, body = api_status(server.url + f"/api/v1/runs/{run.id}/scalars")
    assert (status, body["error"]["code"]) == (422, "invalid_request")
    status, body = api_status(server.url + f"/api/v1/runs/{run.id}/scalars?key=lo%00ss")
    assert (status, body["error"]["code"]) == (422, "invalid_request")
    status, body = api_status(server.url + f"/api/v1/runs/{run.id}/scalars?key=loss&since_step=99999999999999999999")
    assert (status, body["error"]["code"]) == (422, "invalid_request")


def test_server_declines_permessage_deflate(server: ServerProcess) -> None:
    url = server.url.replace("http://", "ws://") + protocol.WS_PATH
    with connect(url, compression="deflate", open_timeout=10) as ws:  # the client offers it
        assert ws.protocol.extensions == []  # measured: deflate cuts loopback ingest 3-5x
