"""trimtab wire protocol v1: frame types, encoding and validation, with no I/O.

Every frame is a msgpack map with a type tag ``t``. Scalars travel columnar: one entry per
key with its steps, wall times and values as packed little-endian arrays (int64, float64,
float64), so a batch of N points costs three ``memcpy``s to encode and decode, and every
float (NaN, +Inf, -Inf and their bit patterns) arrives exactly as it was sent.

The agent builds frames with the ``*_frame`` helpers; the server decodes them with
:func:`decode_agent_frame`, which raises :class:`ProtocolError` with a stable code for any
frame it refuses. See ``docs/protocol.md`` for the prose version.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from trimtab.errors import ErrorCode, TrimtabError
from trimtab.jsonsafe import problem as json_value_problem

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 8 * 1024 * 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1
MAX_KEY_LENGTH = 256
MAX_NAME_LENGTH = 256
MAX_PROJECT_LENGTH = 128
MAX_HISTOGRAM_BINS = 4096
WS_PATH = "/ws/v1/agent"

# Agent -> server
HELLO = "hello"
BATCH = "batch"
CMD_RESULT = "cmd_result"
HEARTBEAT = "heartbeat"
BYE = "bye"
# Server -> agent
WELCOME = "welcome"
ACK = "ack"
CMD = "cmd"
ERROR = "error"

AGENT_FRAME_TYPES = frozenset({HELLO, BATCH, CMD_RESULT, HEARTBEAT, BYE})
SERVER_FRAME_TYPES = frozenset({WELCOME, ACK, CMD, ERROR})

_BIG_ENDIAN = sys.byteorder == "big"


class ProtocolError(TrimtabError):
    """A frame the receiver refuses; ``seq`` names the batch when there is one."""

    def __init__(self, code: ErrorCode, message: str, seq: int | None = None) -> None:
        super().__init__(code, message)
        self.seq = seq


# --------------------------------------------------------------------------- encoding


def encode(frame: Mapping[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def pack_i64(values: array[int]) -> bytes:
    """Little-endian int64 bytes of an ``array('q')``."""
    return _to_le(values)


def pack_f64(values: array[float]) -> bytes:
    """Little-endian float64 bytes of an ``array('d')``; NaN/Inf bit patterns survive."""
    return _to_le(values)


def _to_le(values: array[Any]) -> bytes:
    if _BIG_ENDIAN:
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def unpack_array(typecode: str, data: bytes) -> array[Any]:
    out = array(typecode)
    out.frombytes(data)
    if _BIG_ENDIAN:
        out.byteswap()
    return out


def hello_frame(
    *,
    uid: str,
    project: str,
    name: str | None,
    resume_from_seq: int,
    agent_version: str,
    host: str,
    pid: int,
    rank: int = 0,
    world_size: int = 1,
    config: Mapping[str, Any] | None = None,
    replay: bool = False,
) -> dict[str, Any]:
    return {
        "t": HELLO,
        "v": PROTOCOL_VERSION,
        "run": {"uid": uid, "project": project, "name": name},
        "resume_from_seq": resume_from_seq,
        "agent_version": agent_version,
        "host": host,
        "pid": pid,
        "rank": rank,
        "world_size": world_size,
        "config": dict(config or {}),
        "replay": replay,
    }


def scalar_series(key: str, steps: array[int], walls: array[float], values: array[float]) -> dict[str, Any]:
    return {
        "k": key,
        "steps": pack_i64(steps),
        "walls": pack_f64(walls),
        "values": pack_f64(values),
    }


def histogram_entry(
    key: str,
    step: int,
    wall: float,
    edges: array[float],
    counts: array[int],
    nan: int = 0,
    pinf: int = 0,
    ninf: int = 0,
) -> dict[str, Any]:
    """One histogram: ``len(edges) == len(counts) + 1``, finite increasing edges; non-finite
    values are counted apart (``nan``, ``pinf``, ``ninf``), never binned."""
    return {
        "k": key,
        "step": step,
        "wall": wall,
        "edges": pack_f64(edges),
        "counts": pack_i64(counts),
        "nan": nan,
        "pinf": pinf,
        "ninf": ninf,
    }


def event_entry(
    kind: str, step: int | None, wall: float, data: Mapping[str, Any], level: str = "info"
) -> dict[str, Any]:
    return {"kind": kind, "step": step, "wall": wall, "level": level, "data": dict(data)}


def batch_frame(
    seq: int,
    scalars: list[dict[str, Any]],
    histograms: list[dict[str, Any]] | None = None,
    events: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {"t": BATCH, "seq": seq, "scalars": scalars, "histograms": histograms or [], "events": events or []}


def heartbeat_frame(drops: Mapping[str, int] | None = None) -> dict[str, Any]:
    return {"t": HEARTBEAT, "drops": dict(drops or {})}


def bye_frame(drops: Mapping[str, int] | None = None) -> dict[str, Any]:
    return {"t": BYE, "drops": dict(drops or {})}


def welcome_frame(run_id: int, acked_seq: int) -> dict[str, Any]:
    return {"t": WELCOME, "v": PROTOCOL_VERSION, "run_id": run_id, "acked_seq": acked_seq}


def ack_frame(seq: int) -> dict[str, Any]:
    return {"t": ACK, "seq": seq}


def error_frame(code: ErrorCode, message: str, seq: int | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": ERROR, "code": code.value, "message": message}
    if seq is not None:
        frame["seq"] = seq
    return frame


def cmd_frame(command_id: str, kind: str, args: Mapping[str, Any]) -> dict[str, Any]:
    return {"t": CMD, "id": command_id, "kind": kind, "args": dict(args)}


def cmd_result_frame(
    command_id: str, status: str, step: int | None, detail: Mapping[str, Any] | None
) -> dict[str, Any]:
    return {"t": CMD_RESULT, "id": command_id, "status": status, "step": step, "detail": detail}


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class RunRef:
    uid: str
    project: str
    name: str | None


@dataclass(frozen=True)
class Hello:
    run: RunRef
    resume_from_seq: int
    agent_version: str
    host: str
    pid: int
    rank: int
    world_size: int
    config: dict[str, Any]
    replay: bool = False


@dataclass(frozen=True)
class ScalarSeries:
    key: str
    steps: array[int]
    walls: array[float]
    values: array[float]

    def __len__(self) -> int:
        return len(self.steps)


@dataclass(frozen=True)
class Histogram:
    key: str
    step: int
    wall: float
    edges: array[float]
    counts: array[int]
    nan: int
    pinf: int
    ninf: int


@dataclass(frozen=True)
class Event:
    kind: str
    step: int | None
    wall: float
    level: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Batch:
    seq: int
    scalars: list[ScalarSeries] = field(default_factory=list)
    histograms: list[Histogram] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def n_points(self) -> int:
        return sum(len(s) for s in self.scalars)


@dataclass(frozen=True)
class CmdResult:
    id: str
    status: str
    step: int | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class Heartbeat:
    drops: dict[str, int]


@dataclass(frozen=True)
class Bye:
    drops: dict[str, int]


AgentFrame = Hello | Batch | CmdResult | Heartbeat | Bye


def decode_map(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """Decode one frame into a map with a string ``t``; refuse anything else."""
    if len(data) > max_bytes:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"frame of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(ErrorCode.BAD_FRAME, f"frame is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame must be a map with a string type tag 't'")
    return obj


def decode_agent_frame(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> AgentFrame:
    obj = decode_map(data, max_bytes)
    kind = obj["t"]
    if kind == BATCH:
        return _batch(obj)
    if kind == HELLO:
        return _hello(obj)
    if kind == HEARTBEAT:
        return Heartbeat(drops=_drops(obj))
    if kind == BYE:
        return Bye(drops=_drops(obj))
    if kind == CMD_RESULT:
        return CmdResult(
            id=_req(obj, "id", str),
            status=_req(obj, "status", str),
            step=_opt_int(obj, "step"),
            detail=_opt(obj, "detail", dict) or {},
        )
    raise ProtocolError(
        ErrorCode.UNKNOWN_FRAME, f"unknown frame type {kind!r}; expected one of {sorted(AGENT_FRAME_TYPES)}"
    )


def _hello(obj: dict[str, Any]) -> Hello:
    version = obj.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError(ErrorCode.BAD_FRAME, "hello needs an integer protocol version 'v'")
    if version != PROTOCOL_VERSION:
        newer = "upgrade the server" if version > PROTOCOL_VERSION else "upgrade the agent"
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"agent speaks protocol v{version}; this server speaks v{PROTOCOL_VERSION}: {newer}",
        )
    run = _req(obj, "run", dict)
    uid = _req(run, "uid", str)
    project = _req(run, "project", str)
    if not uid or len(uid) > 64:
        raise ProtocolError(ErrorCode.BAD_FRAME, "run.uid must be 1-64 characters")
    if not project or len(project) > MAX_PROJECT_LENGTH:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"run.project must be 1-{MAX_PROJECT_LENGTH} characters")
    name = _opt(run, "name", str)
    if name is not None and len(name) > MAX_NAME_LENGTH:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"run.name must be at most {MAX_NAME_LENGTH} characters")
    rank = _opt_int(obj, "rank", 0, INT32_MAX) or 0
    world_size = _opt_int(obj, "world_size", 1, INT32_MAX) or 1
    replay = obj.get("replay", False)
    if not isinstance(replay, bool):
        raise ProtocolError(ErrorCode.BAD_FRAME, "field 'replay' must be a boolean")
    return Hello(
        run=RunRef(uid=uid, project=project, name=name),
        resume_from_seq=_opt_int(obj, "resume_from_seq", 0) or 0,
        agent_version=_opt(obj, "agent_version", str) or "",
        host=_opt(obj, "host", str) or "",
        pid=_opt_int(obj, "pid") or 0,
        rank=rank,
        world_size=world_size,
        config=_json_map(obj, "config"),
        replay=replay,
    )


def _batch(obj: dict[str, Any]) -> Batch:
    seq = obj.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= INT64_MAX:
        raise ProtocolError(ErrorCode.BAD_FRAME, "batch needs a positive 64-bit integer 'seq'")
    try:
        scalars = [_series(s) for s in _list(obj, "scalars")]
        histograms = [_histogram(h) for h in _list(obj, "histograms")]
        events = [_event(e) for e in _list(obj, "events")]
    except ProtocolError as exc:
        raise ProtocolError(ErrorCode.INVALID_BATCH, f"batch {seq}: {exc.message}", seq=seq) from None
    return Batch(seq=seq, scalars=scalars, histograms=histograms, events=events)


def _series(obj: Any) -> ScalarSeries:
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.INVALID_BATCH, "each scalars entry must be a map")
    key = _key(obj)
    raw_steps = _req(obj, "steps", bytes)
    raw_walls = _req(obj, "walls", bytes)
    raw_values = _req(obj, "values", bytes)
    if len(raw_steps) % 8 or not (len(raw_steps) == len(raw_walls) == len(raw_values)):
        raise ProtocolError(
            ErrorCode.INVALID_BATCH, f"key {key!r}: steps, walls and values must be equal-length 8-byte arrays"
        )
    walls = unpack_array("d", raw_walls)
    # sum() runs in C; it is finite when every wall time is (barring an overflow, checked exactly)
    if not math.isfinite(sum(walls)) and not all(map(math.isfinite, walls)):
        raise ProtocolError(ErrorCode.INVALID_BATCH, f"key {key!r}: wall times must be finite")
    return ScalarSeries(
        key=key,
        steps=unpack_array("q", raw_steps),
        walls=walls,
        values=unpack_array("d", raw_values),
    )


def _histogram(obj: Any) -> Histogram:
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.INVALID_BATCH, "each histograms entry must be a map")
    key = _key(obj)
    raw_edges, raw_counts = obj.get("edges"), obj.get("counts")
    if not (
        isinstance(raw_edges, bytes)
        and isinstance(raw_counts, bytes)
        and len(raw_edges) % 8 == 0
        and len(raw_counts) % 8 == 0
        and len(raw_edges) == len(raw_counts) + 8
    ):
        raise ProtocolError(
            ErrorCode.INVALID_BATCH,
            f"histogram {key!r}: 'edges' and 'counts' must be packed arrays, len(edges) = len(counts) + 1",
        )
    if len(raw_counts) > 8 * MAX_HISTOGRAM_BINS:
        raise ProtocolError(
            ErrorCode.INVALID_BATCH,
            f"histogram {key!r}: {len(raw_counts) // 8} bins; at most {MAX_HISTOGRAM_BINS} are allowed",
        )
    edges, counts = unpack_array("d", raw_edges), unpack_array("q", raw_counts)
    bad = next((i for i, x in enumerate(edges) if not math.isfinite(x)), None)
    if bad is not None:
        raise ProtocolError(
            ErrorCode.INVALID_BATCH, f"histogram {key!r}: edges must be finite; edge {bad} is {edges[bad]}"
        )
    bad = next((i for i in range(1, len(edges)) if edges[i] < edges[i - 1]), None)
    if bad is not None:
        raise ProtocolError(
            ErrorCode.INVALID_BATCH,
            f"histogram {key!r}: edges must be non-decreasing; edge {bad} ({edges[bad]}) < edge {bad - 1}",
        )
    if counts and min(counts) < 0:
        raise ProtocolError(ErrorCode.INVALID_BATCH, f"histogram {key!r}: bin counts must be >= 0, got {min(counts)}")
    outside = {name: _opt_int(obj, name) or 0 for name in ("nan", "pinf", "ninf")}
    for name, count in outside.items():
        if count < 0:
            raise ProtocolError(ErrorCode.INVALID_BATCH, f"histogram {key!r}: '{name}' must be >= 0, got {count}")
    return Histogram(
        key=key,
        step=_req_int(obj, "step"),
        wall=_req_float(obj, "wall"),
        edges=edges,
        counts=counts,
        nan=outside["nan"],
        pinf=outside["pinf"],
        ninf=outside["ninf"],
    )


def _event(obj: Any) -> Event:
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.INVALID_BATCH, "each events entry must be a map")
    kind = _req(obj, "kind", str)
    if not kind or len(kind) > 64:
        raise ProtocolError(ErrorCode.INVALID_BATCH, "event kind must be 1-64 characters")
    return Event(
        kind=kind,
        step=_opt_int(obj, "step"),
        wall=_req_float(obj, "wall"),
        level=_opt(obj, "level", str) or "info",
        data=_json_map(obj, "data"),
    )


def _json_map(obj: dict[str, Any], name: str) -> dict[str, Any]:
    """A map that a JSON column on every backend accepts: string keys, finite numbers, no bytes."""
    value = _opt(obj, name, dict) or {}
    problem = json_value_problem(value)
    if problem:
        raise ProtocolError(ErrorCode.INVALID_BATCH if name == "data" else ErrorCode.BAD_FRAME, f"'{name}': {problem}")
    return value


def _key(obj: dict[str, Any]) -> str:
    key: str = _req(obj, "k", str)
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ProtocolError(ErrorCode.INVALID_BATCH, f"key must be 1-{MAX_KEY_LENGTH} characters, got {len(key)}")
    return key


def _drops(obj: dict[str, Any]) -> dict[str, int]:
    drops = _opt(obj, "drops", dict) or {}
    if not all(
        isinstance(k, str)
        and "\x00" not in k
        and isinstance(v, int)
        and not isinstance(v, bool)
        and 0 <= v <= INT64_MAX
        for k, v in drops.items()
    ):
        raise ProtocolError(ErrorCode.BAD_FRAME, "'drops' must map reason strings to integer counts")
    return drops


def _list(obj: dict[str, Any], name: str) -> list[Any]:
    value = obj.get(name, [])
    if not isinstance(value, list):
        raise ProtocolError(ErrorCode.INVALID_BATCH, f"'{name}' must be an array")
    return value


def _req(obj: dict[str, Any], name: str, typ: type) -> Any:
    value = obj.get(name)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"field '{name}' must be {_TYPE_NAMES.get(typ, typ.__name__)}")
    if isinstance(value, str) and "\x00" in value:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"field '{name}' may not contain NUL characters")
    return value


def _opt(obj: dict[str, Any], name: str, typ: type) -> Any:
    return None if obj.get(name) is None else _req(obj, name, typ)


def _req_int(obj: dict[str, Any], name: str, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    value: int = _req(obj, name, int)
    if not lo <= value <= hi:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"field '{name}' must be between {lo} and {hi}")
    return value


def _opt_int(obj: dict[str, Any], name: str, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int | None:
    return None if obj.get(name) is None else _req_int(obj, name, lo, hi)


def _req_float(obj: dict[str, Any], name: str) -> float:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"field '{name}' must be a finite number")
    return float(value)


_TYPE_NAMES = {str: "a string", int: "an integer", dict: "a map", bytes: "binary", list: "an array"}
