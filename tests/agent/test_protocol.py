"""Protocol v1: encoding round trips bit-exactly and every kind of bad frame gets its code."""

from __future__ import annotations

import math
import struct
from array import array
from typing import Any

import msgpack
import pytest

from trimtab import protocol
from trimtab.errors import ERROR_TABLE, ErrorCode
from trimtab.protocol import Batch, Bye, Heartbeat, Hello, ProtocolError

WEIRD = [0.0, -0.0, 1.0, -2.5, math.nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308, 1 / 3]


def _hello(**overrides: object) -> dict[str, object]:
    frame = protocol.hello_frame(uid="u1", project="p", name="n", resume_from_seq=1, agent_version="0", host="h", pid=1)
    frame.update(overrides)
    return frame


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def test_batch_round_trips_every_float_bit_pattern() -> None:
    steps = array("q", range(len(WEIRD)))
    walls = array("d", [1.7e9 + i for i in range(len(WEIRD))])
    series = protocol.scalar_series("loss", steps, walls, array("d", WEIRD))
    frame = protocol.decode_agent_frame(protocol.encode(protocol.batch_frame(7, [series])))
    assert isinstance(frame, Batch)
    assert frame.seq == 7 and frame.n_points == len(WEIRD)
    got = frame.scalars[0]
    assert got.key == "loss" and list(got.steps) == list(steps) and list(got.walls) == list(walls)
    assert [_bits(v) for v in got.values] == [_bits(v) for v in WEIRD]


def test_scalars_travel_columnar_not_as_one_map_per_point() -> None:
    series = protocol.scalar_series("k", array("q", [1, 2, 3]), array("d", [0.0] * 3), array("d", [1.0] * 3))
    raw = msgpack.unpackb(protocol.encode(protocol.batch_frame(1, [series])))
    entry = raw["scalars"][0]
    assert set(entry) == {"k", "steps", "walls", "values"}
    assert all(isinstance(entry[c], bytes) and len(entry[c]) == 24 for c in ("steps", "walls", "values"))


def test_hello_round_trip() -> None:
    frame = protocol.decode_agent_frame(protocol.encode(_hello(rank=2, world_size=4, config={"lr": 0.1})))
    assert isinstance(frame, Hello)
    assert (frame.run.uid, frame.run.project, frame.rank, frame.world_size, frame.config) == (
        "u1",
        "p",
        2,
        4,
        {"lr": 0.1},
    )


def test_heartbeat_and_bye_carry_drop_counts() -> None:
    hb = protocol.decode_agent_frame(protocol.encode(protocol.heartbeat_frame({"queue_full": 3})))
    bye = protocol.decode_agent_frame(protocol.encode(protocol.bye_frame({})))
    assert isinstance(hb, Heartbeat) and hb.drops == {"queue_full": 3}
    assert isinstance(bye, Bye) and bye.drops == {}


def test_a_run_says_when_it_started_and_a_replay_when_it_ended() -> None:
    hello = protocol.decode_agent_frame(protocol.encode({**_hello(), "started_at": 1.7e9}))
    bye = protocol.decode_agent_frame(protocol.encode(protocol.bye_frame({}, finished_at=1.7e9 + 60)))
    assert isinstance(hello, Hello) and hello.started_at == 1.7e9
    assert isinstance(bye, Bye) and bye.finished_at == 1.7e9 + 60
    old = protocol.decode_agent_frame(protocol.encode(_hello()))  # an older agent sends neither
    assert isinstance(old, Hello) and old.started_at is None
    for bad in (math.nan, math.inf, -1.0, 0, "yesterday", True):
        with pytest.raises(ProtocolError, match="started_at"):
            protocol.decode_agent_frame(protocol.encode({**_hello(), "started_at": bad}))


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xc1\xc1\xc1", ErrorCode.BAD_FRAME),  # 0xc1 is never valid msgpack
        (msgpack.packb([1, 2, 3]), ErrorCode.BAD_FRAME),
        (msgpack.packb({"no": "tag"}), ErrorCode.BAD_FRAME),
        (msgpack.packb({"t": "launch_missiles"}), ErrorCode.UNKNOWN_FRAME),
        (protocol.encode(_hello(v=2)), ErrorCode.UNSUPPORTED_VERSION),
        (protocol.encode(_hello(v="1")), ErrorCode.BAD_FRAME),
        (protocol.encode(_hello(run={"uid": 5, "project": "p"})), ErrorCode.BAD_FRAME),
        (protocol.encode(_hello(run={"uid": "", "project": "p"})), ErrorCode.BAD_FRAME),
        (protocol.encode({"t": "batch", "seq": "one"}), ErrorCode.BAD_FRAME),
        (protocol.encode({"t": "batch", "seq": 0}), ErrorCode.BAD_FRAME),
        (protocol.encode({"t": "heartbeat", "drops": {"x": "many"}}), ErrorCode.BAD_FRAME),
        (protocol.encode({"t": "heartbeat", "drops": {"x": -1}}), ErrorCode.BAD_FRAME),
        (protocol.encode({"t": "bye", "drops": {"a\x00": 1}}), ErrorCode.BAD_FRAME),
    ],
)
def test_bad_frames_get_a_code(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_agent_frame(data)
    assert info.value.code == code
    assert info.value.message


def test_future_version_message_says_what_to_upgrade() -> None:
    with pytest.raises(ProtocolError, match="upgrade the server"):
        protocol.decode_agent_frame(protocol.encode(_hello(v=99)))


@pytest.mark.parametrize(
    "series",
    [
        {"k": "x", "steps": b"\0" * 8, "walls": b"\0" * 8, "values": b"\0" * 16},  # ragged columns
        {"k": "x", "steps": b"\0" * 7, "walls": b"\0" * 7, "values": b"\0" * 7},  # not 8-byte items
        {"k": "x", "steps": [1], "walls": [1.0], "values": [1.0]},  # arrays instead of packed bytes
        {"k": "", "steps": b"", "walls": b"", "values": b""},
        {"k": "x" * 300, "steps": b"", "walls": b"", "values": b""},
        "not a map",
    ],
)
def test_invalid_batch_names_its_seq(series: object) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_agent_frame(protocol.encode({"t": "batch", "seq": 12, "scalars": [series]}))
    assert info.value.code == ErrorCode.INVALID_BATCH
    assert info.value.seq == 12


def test_frame_over_the_limit_is_refused_before_decoding() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_agent_frame(b"\x80" * 101, max_bytes=100)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_every_error_code_has_an_http_status_and_close_code() -> None:
    for code in ErrorCode:
        status, close = ERROR_TABLE[code]
        assert 400 <= status < 600
        assert close in (1003, 1007, 1009, 1011, 1013) or 4000 <= close < 5000


@pytest.mark.parametrize(
    "entry",
    [
        {"histograms": [{"k": "h", "step": 1, "wall": 0.0, "edges": b"\0" * 20, "counts": b"\0" * 12}]},
        {"histograms": [{"k": "h", "step": 1, "wall": 0.0, "edges": b"\0" * 16, "counts": b"\0" * 16}]},
        {"events": [{"kind": "nan", "wall": 0.0, "data": {"raw": b"bytes"}}]},
        {"events": [{"kind": "nan", "wall": 0.0, "data": {"value": math.nan}}]},
        {"events": [{"kind": "nan", "wall": 0.0, "data": {"text": "nul\x00"}}]},
        {"events": [{"kind": "nan", "wall": 0.0, "data": {"big": 2**63}}]},
    ],
)
def test_histograms_and_events_the_store_cannot_hold_are_invalid_batches(entry: dict[str, object]) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_agent_frame(protocol.encode({"t": "batch", "seq": 3, **entry}))
    assert (info.value.code, info.value.seq) == (ErrorCode.INVALID_BATCH, 3)


def test_hello_config_must_be_storable_and_name_bounded() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_agent_frame(protocol.encode(_hello(config={"lr": math.inf})))
    assert info.value.code == ErrorCode.BAD_FRAME and "config" in info.value.message
    with pytest.raises(ProtocolError):
        protocol.decode_agent_frame(protocol.encode(_hello(run={"uid": "u", "project": "p", "name": "n" * 257})))


def test_valid_histogram_round_trips() -> None:
    edges, counts = array("d", [0.0, 0.5, 1.0]), array("q", [3, 4])
    entry = {
        "k": "w",
        "step": 2,
        "wall": 1.0,
        "edges": protocol.pack_f64(edges),
        "counts": protocol.pack_i64(counts),
        "nan": 1,
        "pinf": 2,
        "ninf": 3,
    }
    frame = protocol.decode_agent_frame(protocol.encode({"t": "batch", "seq": 1, "histograms": [entry]}))
    assert isinstance(frame, Batch)
    h = frame.histograms[0]
    assert (list(h.edges), list(h.counts), h.nan, h.pinf, h.ninf) == ([0.0, 0.5, 1.0], [3, 4], 1, 2, 3)


def test_non_finite_wall_times_are_refused() -> None:
    series = protocol.scalar_series("k", array("q", [1, 2]), array("d", [1.0, math.nan]), array("d", [1.0, 2.0]))
    with pytest.raises(ProtocolError) as info:
        protocol.decode_agent_frame(protocol.encode(protocol.batch_frame(4, [series])))
    assert (info.value.code, info.value.seq) == (ErrorCode.INVALID_BATCH, 4)
    event = {"kind": "x", "wall": math.inf}
    with pytest.raises(ProtocolError):
        protocol.decode_agent_frame(protocol.encode({"t": "batch", "seq": 1, "events": [event]}))


def test_huge_finite_wall_times_are_still_accepted() -> None:
    walls = array("d", [1.7e308, 1.7e308])  # their sum overflows; each is finite
    series = protocol.scalar_series("k", array("q", [1, 2]), walls, array("d", [1.0, 2.0]))
    frame = protocol.decode_agent_frame(protocol.encode(protocol.batch_frame(1, [series])))
    assert isinstance(frame, Batch) and list(frame.scalars[0].walls) == list(walls)


def _histogram_frame(edges: list[float], counts: list[int], **extra: object) -> bytes:
    entry = protocol.histogram_entry("w/fc1", 1, 1.0, array("d", edges), array("q", counts))
    entry.update(extra)
    return protocol.encode(protocol.batch_frame(9, [], [entry]))


H = "histogram 'w/fc1': "


@pytest.mark.parametrize(
    ("edges", "counts", "extra", "why"),
    [
        ([0.0, math.nan, 1.0], [1, 1], {}, H + "edges must be finite; edge 1 is nan"),
        ([-math.inf, 0.0], [1], {}, H + "edges must be finite; edge 0 is -inf"),
        ([0.0, math.inf], [1], {}, H + "edges must be finite; edge 1 is inf"),
        ([0.0, 2.0, 1.0], [1, 1], {}, H + "edges must be non-decreasing; edge 2 (1.0) < edge 1"),
        ([1.0, -0.5], [1], {}, H + "edges must be non-decreasing"),
        ([float(i) for i in range(4098)], [0] * 4097, {}, H + "4097 bins; at most 4096"),
        ([0.0, 1.0, 2.0], [3, -1], {}, H + "bin counts must be >= 0, got -1"),
        ([0.0, 1.0], [1], {"nan": -1}, H + "'nan' must be >= 0, got -1"),
        ([0.0, 1.0], [1], {"pinf": -2}, H + "'pinf' must be >= 0"),
        ([0.0, 1.0], [1], {"ninf": -(2**63)}, H + "'ninf' must be >= 0"),
        ([0.0, 1.0], [1], {"nan": 1.5}, "'nan' must be an integer"),
        ([0.0, 1.0], [1], {"pinf": 2**63}, "'pinf' must be between"),
    ],
)
def test_histograms_with_bad_bins_or_counts_are_invalid_batches(
    edges: list[float], counts: list[int], extra: dict[str, object], why: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_agent_frame(_histogram_frame(edges, counts, **extra))
    assert (info.value.code, info.value.seq) == (ErrorCode.INVALID_BATCH, 9)
    assert info.value.message.startswith("batch 9: ")
    assert why in info.value.message


def test_histograms_at_the_limits_are_accepted() -> None:
    edges = [-1.7976931348623157e308, *[i / 4096 for i in range(4095)], 1.7976931348623157e308]
    counts = [0] * 4095 + [2**63 - 1]  # exactly 4096 bins
    frame = protocol.decode_agent_frame(_histogram_frame(edges, counts, nan=2**63 - 1, pinf=0, ninf=None))
    assert isinstance(frame, Batch)
    h = frame.histograms[0]
    assert (list(h.edges), list(h.counts), h.nan, h.pinf, h.ninf) == (edges, counts, 2**63 - 1, 0, 0)
    flat = protocol.decode_agent_frame(_histogram_frame([2.0, 2.0, 2.0], [0, 5]))  # equal edges: one value
    assert isinstance(flat, Batch) and list(flat.histograms[0].edges) == [2.0, 2.0, 2.0]
    empty = protocol.decode_agent_frame(_histogram_frame([0.0], []))
    assert isinstance(empty, Batch) and list(empty.histograms[0].counts) == []


def test_server_frames_decode_into_typed_frames() -> None:
    def back(frame: dict[str, Any]) -> protocol.ServerFrame:
        return protocol.decode_server_frame(protocol.encode(frame))

    assert back(protocol.welcome_frame(7, 41)) == protocol.Welcome(run_id=7, acked_seq=41)
    assert back(protocol.ack_frame(42)) == protocol.Ack(seq=42)
    assert back(protocol.cmd_frame("c1", "reduce_lr", {"factor": 0.5})) == protocol.Command(
        "c1", "reduce_lr", {"factor": 0.5}
    )
    error = back(protocol.error_frame(ErrorCode.INVALID_BATCH, "bad batch", seq=9))
    assert error == protocol.ServerError("invalid_batch", "bad batch", 9)
    assert back(protocol.error_frame(ErrorCode.UNAUTHORIZED, "no")) == protocol.ServerError("unauthorized", "no")


def test_a_malformed_command_keeps_its_id_so_it_can_be_rejected() -> None:
    frame = protocol.decode_server_frame(protocol.encode({"t": "cmd", "id": "c2", "kind": 5, "args": []}))
    assert isinstance(frame, protocol.Command) and frame.id == "c2" and frame.problem
    no_args = protocol.decode_server_frame(protocol.encode({"t": "cmd", "id": "c3", "kind": "stop"}))
    assert no_args == protocol.Command("c3", "stop", {})


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"t": "cmd", "kind": "stop", "args": {}}, ErrorCode.BAD_FRAME),  # no id: nothing to answer to
        ({"t": "ack", "seq": "7"}, ErrorCode.BAD_FRAME),
        ({"t": "ack", "seq": 0}, ErrorCode.BAD_FRAME),
        ({"t": "welcome", "run_id": 1}, ErrorCode.BAD_FRAME),
        ({"t": "launch"}, ErrorCode.UNKNOWN_FRAME),
        ({"t": "hello"}, ErrorCode.UNKNOWN_FRAME),  # an agent's frame is not the server's
    ],
)
def test_bad_server_frames_are_refused_with_a_code(frame: dict[str, Any], code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_server_frame(protocol.encode(frame))
    assert info.value.code == code
