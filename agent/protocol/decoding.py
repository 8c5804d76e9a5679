"""Frames as values: the decoded frame of each type (both directions) and the decoders that
check every field, raising :class:`ProtocolError` with a stable code for anything refused."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

from trimtab.errors import ErrorCode
from trimtab.jsonsafe import problem as json_value_problem
from trimtab.protocol.encoding import ProtocolError, decode_map, unpack_array
from trimtab.protocol.vocabulary import (
    ACK,
    AGENT_FRAME_TYPES,
    BATCH,
    BYE,
    CMD,
    CMD_RESULT,
    ERROR,
    HEARTBEAT,
    HELLO,
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    MAX_FRAME_BYTES,
    MAX_HISTOGRAM_BINS,
    MAX_KEY_LENGTH,
    MAX_NAME_LENGTH,
    MAX_PROJECT_LENGTH,
    PROTOCOL_VERSION,
    SERVER_FRAME_TYPES,
    WELCOME,
)

# --------------------------------------------------------------------------- agent -> server


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
    started_at: float | None = None  # the wall time of trimtab.init (epoch seconds)


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
    finished_at: float | None = None  # a replay's: when the run really ended (epoch seconds)


AgentFrame = Hello | Batch | CmdResult | Heartbeat | Bye


# --------------------------------------------------------------------------- server -> agent


@dataclass(frozen=True)
class Welcome:
    run_id: int
    acked_seq: int


@dataclass(frozen=True)
class Ack:
    seq: int


@dataclass(frozen=True)
class Command:
    """A ``cmd`` frame: a command for the training process. ``problem`` says why a command
    whose id is readable cannot be applied (its kind or arguments are malformed): the agent
    rejects it with that reason rather than ignore it."""

    id: str
    kind: str
    args: dict[str, Any]
    problem: str | None = None


@dataclass(frozen=True)
class ServerError:
    code: str
    message: str
    seq: int | None = None  # the batch refused, when the error is about one


ServerFrame = Welcome | Ack | Command | ServerError


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
        return Bye(drops=_drops(obj), finished_at=_opt_time(obj, "finished_at"))
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


def decode_server_frame(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> ServerFrame:
    """A frame from the server, checked like the server checks the agent's."""
    obj = decode_map(data, max_bytes)
    kind = obj["t"]
    if kind == ACK:
        return Ack(seq=_req_int(obj, "seq", 1, INT64_MAX))
    if kind == CMD:
        return _command(obj)
    if kind == WELCOME:
        return Welcome(run_id=_req_int(obj, "run_id", 1, INT64_MAX), acked_seq=_req_int(obj, "acked_seq", 0, INT64_MAX))
    if kind == ERROR:
        return ServerError(
            code=str(obj.get("code")), message=str(obj.get("message")), seq=_opt_int(obj, "seq", 1, INT64_MAX)
        )
    raise ProtocolError(
        ErrorCode.UNKNOWN_FRAME, f"unknown frame type {kind!r}; expected one of {sorted(SERVER_FRAME_TYPES)}"
    )


def _command(obj: dict[str, Any]) -> Command:
    ident = obj.get("id")
    if not isinstance(ident, str) or not ident:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"a command without an id: {obj!r}"[:300])
    kind, args = obj.get("kind"), obj.get("args")
    if not isinstance(kind, str) or not isinstance(args, (dict, type(None))):
        return Command(ident, "", {}, problem="malformed command: kind must be a string, args a map")
    return Command(ident, kind, dict(args or {}))


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
        started_at=_opt_time(obj, "started_at"),
    )


def _opt_time(obj: dict[str, Any], name: str) -> float | None:
    """An optional wall time in epoch seconds: a finite positive number."""
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e11:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"field {name!r} must be a wall time in epoch seconds")
    return float(value)


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
