"""Histograms and events: sent over a real websocket to a real server, read back through REST,
exactly, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import ServerProcess, api_status
from tests.server.wire import WireAgent, histogram, scalars
from trimtab import protocol

# finite, non-decreasing edges whose JSON text must round-trip exactly; counts up to int64
EDGES = [-1.7976931348623157e308, -2.5, -0.0, 5e-324, 1e-300, 1 / 3, 1 / 3, 1.7976931348623157e308]
COUNTS = [0, 2**62, 7, 1, 0, 3, 2**63 - 1]


def _get(server: ServerProcess, path: str) -> Any:
    return server.get(path)


def test_histograms_come_back_exactly_and_in_step_order(server: ServerProcess) -> None:
    with WireAgent(server, "hist-exact") as agent:
        agent.store(
            1,
            histograms=[
                histogram("weights/fc1", 3, EDGES, COUNTS, nan=5, pinf=2**40, ninf=1),
                histogram("weights/fc1", 1, [0.0, 1.0], [4]),
                histogram("grads/fc1", 1, [-1.0, 0.0, 1.0], [2, 3], ninf=9),
            ],
        )
        agent.store(2, histograms=[histogram("weights/fc1", 2, [0.5, 0.5, 0.75], [0, 11])])
        run_id = agent.run_id
    data = _get(server, f"/api/v1/runs/{run_id}/histograms?key=weights/fc1")
    assert data == {
        "run_id": run_id,
        "key": "weights/fc1",
        "rank": 0,
        "truncated": False,
        "histograms": [
            {
                "step": 1,
                "wall_time": 1.7e9 + 1.25,
                "edges": [0.0, 1.0],
                "counts": [4],
                "nan": 0,
                "pinf": 0,
                "ninf": 0,
            },
            {
                "step": 2,
                "wall_time": 1.7e9 + 2.25,
                "edges": [0.5, 0.5, 0.75],
                "counts": [0, 11],
                "nan": 0,
                "pinf": 0,
                "ninf": 0,
            },
            {
                "step": 3,
                "wall_time": 1.7e9 + 3.25,
                "edges": EDGES,
                "counts": COUNTS,
                "nan": 5,
                "pinf": 2**40,
                "ninf": 1,
            },
        ],
    }
    assert str(data["histograms"][2]["edges"][2]) == "-0.0"  # stored as packed bytes: the sign survives
    grads = _get(server, f"/api/v1/runs/{run_id}/histograms?key=grads/fc1")["histograms"]
    assert [(h["step"], h["edges"], h["counts"], h["ninf"]) for h in grads] == [(1, [-1.0, 0.0, 1.0], [2, 3], 9)]
    assert _get(server, f"/api/v1/runs/{run_id}")["n_histograms"] == 4


def test_histogram_step_range_and_limit_keep_the_newest(server: ServerProcess) -> None:
    with WireAgent(server, "hist-range") as agent:
        for seq, first in enumerate(range(0, 30, 10), start=1):
            agent.store(seq, histograms=[histogram("h", s, [0.0, 1.0], [s]) for s in range(first, first + 10)])
        run_id = agent.run_id

    def steps(query: str) -> tuple[list[int], bool]:
        data = _get(server, f"/api/v1/runs/{run_id}/histograms?key=h&{query}")
        assert [h["counts"] for h in data["histograms"]] == [[h["step"]] for h in data["histograms"]]
        return [h["step"] for h in data["histograms"]], data["truncated"]

    assert steps("since_step=25") == ([26, 27, 28, 29], False)
    assert steps("since_step=4&end_step=10") == ([5, 6, 7, 8, 9, 10], False)
    assert steps("limit=5") == ([25, 26, 27, 28, 29], True)
    assert steps("limit=5&end_step=24") == ([20, 21, 22, 23, 24], True)  # paging back from the first step
    assert steps("limit=4&since_step=25") == ([26, 27, 28, 29], False)  # exactly limit: nothing left out
    assert steps("limit=29") == (list(range(1, 30)), True)
    assert steps("limit=30") == (list(range(30)), False)
    assert steps("since_step=29") == ([], False)
    assert steps("since_step=-5&end_step=-1") == ([], False)


def test_keys_count_histograms_and_scalars(server: ServerProcess) -> None:
    with WireAgent(server, "keys") as agent:
        agent.store(
            1,
            scalars=[scalars("loss", [0, 1, 2], [3.0, 2.0, 1.0])],
            histograms=[histogram("w", 4, [0.0, 1.0], [1]), histogram("w", 9, [0.0, 1.0], [1])],
        )
        agent.store(2, histograms=[histogram("w", 7, [0.0, 1.0], [1]), histogram("g", 2, [0.0, 1.0], [1])])
        run_id = agent.run_id
    assert _get(server, f"/api/v1/runs/{run_id}/keys") == [
        {"key": "g", "kind": "histogram", "rank": 0, "count": 1, "last_step": 2},
        {"key": "w", "kind": "histogram", "rank": 0, "count": 3, "last_step": 9},
        {"key": "loss", "kind": "scalar", "rank": 0, "count": 3, "last_step": 2},
    ]
    assert _get(server, f"/api/v1/runs/{run_id}/keys?rank=0") == _get(server, f"/api/v1/runs/{run_id}/keys")
    assert _get(server, f"/api/v1/runs/{run_id}/keys?rank=1") == []


EVENTS = [
    protocol.event_entry("nan", 5, 1.7e9 + 0.5, {"module": "fc1", "where": ["grad", 3], "ok": False}, "error"),
    protocol.event_entry("lr_change", None, 1.7e9 + 1.5, {"from": 1 / 3, "to": 1e-300, "big": 2**62 - 1}),
    protocol.event_entry("nan", 7, 1.7e9 + 2.5, {"nested": {"a": [{"b": None}], "é": "ünï"}}, "warning"),
    protocol.event_entry("checkpoint", 10, 1.7e9 + 3.5, {}, "x" * 20),
]


def test_events_come_back_exactly_with_filters_and_paging(server: ServerProcess) -> None:
    with WireAgent(server, "events") as agent:
        agent.store(1, events=EVENTS[:2])
        agent.store(2, events=EVENTS[2:])
        run_id = agent.run_id
    with WireAgent(server, "events", rank=1, world_size=2) as rank1:
        rank1.store(1, events=[protocol.event_entry("nan", 8, 1.7e9 + 9.0, {"rank": 1}, "error")])

    got = _get(server, f"/api/v1/runs/{run_id}/events")
    ids = [e.pop("id") for e in got]
    assert ids == sorted(ids) and len(set(ids)) == 5
    expected = [
        {
            "rank": 0,
            "step": e["step"],
            "wall_time": e["wall"],
            "kind": e["kind"],
            "level": e["level"],
            "data": e["data"],
        }
        for e in EVENTS
    ]
    expected[3]["level"] = "x" * 16  # stored cut to 16 characters
    expected.append(
        {"rank": 1, "step": 8, "wall_time": 1.7e9 + 9.0, "kind": "nan", "level": "error", "data": {"rank": 1}}
    )
    assert got == expected
    assert _get(server, f"/api/v1/runs/{run_id}")["n_events"] == 5

    def steps(query: str) -> list[int | None]:
        return [e["step"] for e in _get(server, f"/api/v1/runs/{run_id}/events?{query}")]

    assert steps("kind=nan") == [5, 7, 8]
    assert steps("level=error") == [5, 8]
    assert steps("kind=nan&level=warning") == [7]
    assert steps("rank=1") == [8]
    assert steps("rank=0&kind=nan") == [5, 7]
    assert steps("since_step=5") == [7, 10, 8]  # no step: never after one
    assert steps(f"after_id={ids[2]}") == [10, 8]
    assert steps("limit=2") == [5, None]
    assert steps("kind=nothing") == []

    paged: list[int] = []
    after = 0
    while page := _get(server, f"/api/v1/runs/{run_id}/events?limit=2&after_id={after}"):
        assert len(page) <= 2
        paged += [e["id"] for e in page]
        after = page[-1]["id"]
    assert paged == ids


def test_unknown_runs_and_keys_are_404(server: ServerProcess) -> None:
    with WireAgent(server, "404") as agent:
        agent.store(1, scalars=[scalars("loss", [0], [1.0])], histograms=[histogram("w", 0, [0.0, 1.0], [1])])
        run_id = agent.run_id
    base = server.url + "/api/v1/runs"
    for path in ("424242/keys", "424242/histograms?key=w", "424242/events", "424242/scalars?key=loss"):
        status, body = api_status(f"{base}/{path}")
        assert (status, body["error"]["code"]) == (404, "run_not_found"), path
    for path in ("histograms?key=missing", "histograms?key=loss", "histograms?key=w&rank=1", "scalars?key=w"):
        status, body = api_status(f"{base}/{run_id}/{path}")
        assert (status, body["error"]["code"]) == (404, "key_not_found"), path
        assert body["error"]["message"]
    status, body = api_status(f"{base}/{run_id}/scalars?key=loss&rank=1")
    assert (status, body["error"]["code"]) == (404, "key_not_found")
    assert "rank 1" in body["error"]["message"]


@pytest.mark.parametrize(
    "query",
    [
        "histograms",  # key is required
        "histograms?key=",
        "histograms?key=w&limit=0",
        "histograms?key=w&limit=10001",
        "histograms?key=w&rank=-1",
        "histograms?key=w&rank=2147483648",
        "histograms?key=w&since_step=9223372036854775808",
        "histograms?key=w&end_step=x",
        "histograms?key=w%00x",
        "scalars?key=loss&rank=-1",
        "keys?rank=-1",
        "keys?rank=one",
        "events?limit=0",
        "events?limit=10001",
        "events?after_id=-1",
        "events?after_id=9223372036854775808",
        "events?rank=2147483648",
        "events?since_step=-9223372036854775809",
        "events?kind=" + "k" * 65,
        "events?kind=",
        "events?level=" + "l" * 17,
        "events?level=a%00b",
    ],
)
def test_bad_query_parameters_are_422(server: ServerProcess, query: str) -> None:
    status, body = api_status(f"{server.url}/api/v1/runs/1/{query}")
    assert (status, body["error"]["code"]) == (422, "invalid_request"), body
