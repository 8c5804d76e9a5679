"""Frames as bytes: the error a receiver raises, msgpack encoding and decoding of a frame
map, the packed little-endian arrays scalars and histograms travel in, and the builders of
every frame (agent -> server and server -> agent)."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Mapping
from typing import Any

import msgpack

from trimtab.errors import ErrorCode, TrimtabError
from trimtab.protocol.vocabulary import (
    ACK,
    BATCH,
    BYE,
    CMD,
    CMD_RESULT,
    ERROR,
    HEARTBEAT,
    HELLO,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    WELCOME,
)

_BIG_ENDIAN = sys.byteorder == "big"


class ProtocolError(TrimtabError):
    """A frame the receiver refuses; ``seq`` names the batch when there is one."""

    def __init__(self, code: ErrorCode, message: str, seq: int | None = None) -> None:
        super().__init__(code, message)
        self.seq = seq


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
    started_at: float | None = None,
) -> dict[str, Any]:
    frame = {
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
    if started_at is not None:  # the wall time of trimtab.init: a run replayed later keeps it
        frame["started_at"] = started_at
    return frame


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


def bye_frame(drops: Mapping[str, int] | None = None, finished_at: float | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": BYE, "drops": dict(drops or {})}
    if finished_at is not None:  # a replay's bye: when the run really ended
        frame["finished_at"] = finished_at
    return frame


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
