"""One JSON policy for everything trimtab stores or sends as JSON: run configs, event data,
command arguments and details, notification bodies, detector states, REST responses.

JSON has no NaN or infinity, PostgreSQL's ``json`` refuses them, and both refuse NUL
characters in text. So :func:`to_json` makes any value storable the same way everywhere:

- NaN, +Inf and -Inf become the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (as
  protobuf's JSON mapping spells them); :func:`from_json` turns those strings back into
  floats, so a stored config or detector state with ``inf`` in it reads back as a float;
- NUL characters are removed from strings and map keys;
- integers outside int64 become their decimal text; map keys become text;
- tuples become lists; bytes become ``"(N bytes)"``; NumPy and torch scalars their value;
  anything else its ``str()``;
- past ``MAX_DEPTH`` levels of nesting, the rest becomes ``"(nested too deeply)"``.

:func:`problem` says why a value received from someone else is not already storable (the
server refuses such frames rather than rewriting them).
"""

from __future__ import annotations

import json
import math
from typing import Any

NAN_JSON = "NaN"
POS_INF_JSON = "Infinity"
NEG_INF_JSON = "-Infinity"
NON_FINITE = {NAN_JSON: math.nan, POS_INF_JSON: math.inf, NEG_INF_JSON: -math.inf}
MAX_DEPTH = 32
TOO_DEEP = "(nested too deeply)"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def float_to_json(value: float) -> float | str:
    """A float as JSON can carry it: itself, or one of the three strings for NaN and ±Inf."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return NAN_JSON
    return POS_INF_JSON if value > 0 else NEG_INF_JSON


def float_from_json(value: float | int | str) -> float:
    """Inverse of :func:`float_to_json`; any other string is a ValueError."""
    if isinstance(value, str):
        try:
            return NON_FINITE[value]
        except KeyError:
            raise ValueError(f"not a trimtab JSON float: {value!r}") from None
    return float(value)


def to_json(value: Any, depth: int = 0) -> Any:
    """``value`` made storable as JSON on every backend (the module docstring has the rules)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if INT64_MIN <= value <= INT64_MAX else str(value)
    if isinstance(value, float):
        return float_to_json(value)
    if isinstance(value, str):
        return value.replace("\x00", "")
    if depth >= MAX_DEPTH:
        return TOO_DEEP
    if isinstance(value, (list, tuple)):
        return [to_json(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k).replace("\x00", ""): to_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return f"({len(value)} bytes)"
    item = getattr(value, "item", None)  # NumPy and torch scalars
    if callable(item):
        try:
            return to_json(item(), depth + 1)
        except Exception:  # a tensor of several elements, or one that cannot be read
            pass
    return str(value).replace("\x00", "")


def from_json(value: Any) -> Any:
    """A value stored by :func:`to_json` with its non-finite floats made floats again."""
    if isinstance(value, str):
        return NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def dumps(value: Any) -> bytes:
    """Compact JSON bytes of ``to_json(value)``."""
    return json.dumps(to_json(value), allow_nan=False, separators=(",", ":")).encode()


def problem(value: Any, depth: int = 0) -> str | None:
    """Why ``value`` is not already storable as JSON under this policy, or None when it is."""
    if depth > MAX_DEPTH:
        return "nested too deeply"
    if value is None or isinstance(value, (bool, int, str)):
        if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            return "integer out of the 64-bit range"
        if isinstance(value, str) and "\x00" in value:
            return "strings may not contain NUL"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "non-finite floats cannot be stored as JSON"
    if isinstance(value, (list, tuple)):
        return next((p for p in (problem(v, depth + 1) for v in value) if p), None)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return "map keys must be strings"
        if any("\x00" in k for k in value):
            return "strings may not contain NUL"
        return next((p for p in (problem(v, depth + 1) for v in value.values()) if p), None)
    return f"values of type {type(value).__name__} cannot be stored as JSON"
