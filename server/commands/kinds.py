"""What a command request may say: the built-in kinds and their arguments, user-defined kinds,
the id and the expiry. Pure code; every refusal is ``invalid_command`` naming the field.

The agent checks again when it applies a command (an optimizer without ``weight_decay``, a
rollback with no snapshot), and rejects it with a reason; here the server refuses what no
agent could apply, before anything is stored.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from trimtab.autopilot import AutopilotOptions
from trimtab.errors import ErrorCode, TrimtabError
from trimtab.jsonsafe import problem as json_problem
from trimtab.protocol import INT64_MAX

DEFAULT_EXPIRES_IN_S = 3600.0
MAX_EXPIRES_IN_S = 7 * 24 * 3600.0
MAX_USER_ARGS_BYTES = 16 * 1024
MAX_SKIP_BATCHES = 100_000
MAX_HPARAM_LIST = 16  # betas is 2; nothing an optimizer has is longer
USER_KIND = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
COMMAND_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
HPARAM_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Param-group fields set_hparams may not touch: the LR has set_lr (which keeps the schedule's
# shape), and the others are not hyper-parameters.
NOT_HPARAMS = ("lr", "initial_lr", "params")
BODY_FIELDS = ("kind", "args", "id", "expires_in_s")


@dataclass(frozen=True)
class CommandRequest:
    kind: str
    args: dict[str, Any]
    id: str | None  # None: the server makes one
    expires_in_s: float


def invalid(message: str) -> TrimtabError:
    return TrimtabError(ErrorCode.INVALID_COMMAND, message)


def parse_request(body: Any) -> CommandRequest:
    """The POST body ``{"kind", "args"?, "id"?, "expires_in_s"?}``, checked field by field."""
    if not isinstance(body, dict):
        raise invalid('the body must be a JSON object: {"kind": ..., "args": {...}}')
    unknown = sorted(set(body) - set(BODY_FIELDS))
    if unknown:
        raise invalid(f"unknown field(s) {', '.join(map(repr, unknown))}; a command has {', '.join(BODY_FIELDS)}")
    kind = body.get("kind")
    if not isinstance(kind, str):
        raise invalid("'kind' is required: a built-in kind (" + ", ".join(BUILTIN_KINDS) + ") or your own")
    args = body.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise invalid(f"'args' must be a JSON object, got {type(args).__name__}")
    ident = body.get("id")
    if ident is not None and (not isinstance(ident, str) or not COMMAND_ID.match(ident)):
        raise invalid(
            "'id' must be 1-64 characters: letters, digits, '_', '.', ':', '-', starting with a letter or digit"
        )
    expires = body.get("expires_in_s", DEFAULT_EXPIRES_IN_S)
    if (
        isinstance(expires, bool)
        or not isinstance(expires, (int, float))
        or not math.isfinite(expires)
        or not 0 < expires <= MAX_EXPIRES_IN_S
    ):
        raise invalid(f"'expires_in_s' must be a number of seconds in (0, {MAX_EXPIRES_IN_S:g}] (7 days)")
    return CommandRequest(kind=kind, args=check_args(kind, args), id=ident, expires_in_s=float(expires))


def check_args(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """``args`` if they fit ``kind``; a built-in kind's arguments are checked exactly."""
    builtin = BUILTIN_KINDS.get(kind)
    if builtin is not None:
        builtin(args)
        return args
    if not USER_KIND.match(kind):
        raise invalid(
            f"unknown command kind {kind!r}: built-in kinds are {', '.join(BUILTIN_KINDS)}; your own kinds "
            "(registered with run.on_command) are 1-64 characters of a-z, 0-9, '_', '.', '-', starting with a letter"
        )
    problem = json_problem(args)
    if problem:
        raise invalid(f"{kind}: args: {problem}")
    size = len(json.dumps(args, separators=(",", ":")).encode())
    if size > MAX_USER_ARGS_BYTES:
        raise invalid(f"{kind}: args are {size} bytes of JSON; at most {MAX_USER_ARGS_BYTES}")
    return args


# ---------------------------------------------------------------- built-in kinds


def _fields(kind: str, args: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(args) - set(required) - set(optional))
    if unknown:
        allowed = ", ".join(required + optional) or "none"
        raise invalid(f"{kind}: unknown argument(s) {', '.join(map(repr, unknown))} (allowed: {allowed})")
    missing = [name for name in required if name not in args]
    if missing:
        raise invalid(f"{kind}: missing argument(s) {', '.join(map(repr, missing))}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reduce_lr(args: Mapping[str, Any]) -> None:
    _fields("reduce_lr", args, ("factor",), ("min_lr",))
    factor = args["factor"]
    if not _is_number(factor) or not 0 < factor < 1:
        raise invalid(f"reduce_lr: 'factor' must be a number with 0 < factor < 1, got {factor!r}")
    if "min_lr" in args and (not _is_number(args["min_lr"]) or args["min_lr"] < 0):
        raise invalid(f"reduce_lr: 'min_lr' must be a finite number >= 0, got {args['min_lr']!r}")


def _set_lr(args: Mapping[str, Any]) -> None:
    _fields("set_lr", args, ("lr",))
    if not _is_number(args["lr"]) or args["lr"] <= 0:
        raise invalid(f"set_lr: 'lr' must be a finite number > 0, got {args['lr']!r}")


def _set_hparams(args: Mapping[str, Any]) -> None:
    if not args:
        raise invalid('set_hparams: give at least one param-group field, e.g. {"weight_decay": 0.1}')
    for name, value in args.items():
        if name in NOT_HPARAMS:
            raise invalid(f"set_hparams: {name!r} cannot be set here (use set_lr for the learning rate)")
        if not HPARAM_FIELD.match(name):
            raise invalid(f"set_hparams: {name!r} is not a param-group field name")
        if _is_number(value):
            continue
        if isinstance(value, list) and 0 < len(value) <= MAX_HPARAM_LIST and all(_is_number(v) for v in value):
            continue
        raise invalid(f"set_hparams: {name!r} must be a finite number or a list of finite numbers, got {value!r}")


def _skip_batches(args: Mapping[str, Any]) -> None:
    _fields("skip_batches", args, ("n",))
    n = args["n"]
    if not _is_int(n) or not 1 <= n <= MAX_SKIP_BATCHES:
        raise invalid(f"skip_batches: 'n' must be an integer from 1 to {MAX_SKIP_BATCHES}, got {n!r}")


def _rollback(args: Mapping[str, Any]) -> None:
    _fields("rollback", args, (), ("to_step",))
    if "to_step" in args and (not _is_int(args["to_step"]) or not 0 <= args["to_step"] <= INT64_MAX):
        raise invalid(f"rollback: 'to_step' must be an integer >= 0, got {args['to_step']!r}")


# set_autopilot's options: AutopilotOptions' own fields and types (trimtab.autopilot imports no
# torch), so the server accepts exactly what the agent's autopilot takes.
_HINTS = get_type_hints(AutopilotOptions)
AUTOPILOT_OPTIONS: dict[str, type] = {f.name: _HINTS[f.name] for f in fields(AutopilotOptions)}
AUTOPILOT_ENABLED = "enabled"


def autopilot_problem(args: Mapping[str, Any]) -> str | None:
    """Why ``args`` is not a valid autopilot policy (``{"enabled"?: bool, <option>: value}``),
    naming the field, or None. The ranges are ``AutopilotOptions.check``'s."""
    unknown = sorted(set(args) - {AUTOPILOT_ENABLED} - set(AUTOPILOT_OPTIONS))
    if unknown:
        known = ", ".join([AUTOPILOT_ENABLED, *AUTOPILOT_OPTIONS])
        return f"unknown field(s) {', '.join(map(repr, unknown))} (known: {known})"
    if not isinstance(args.get(AUTOPILOT_ENABLED, True), bool):
        return f"'enabled' must be true or false, got {args[AUTOPILOT_ENABLED]!r}"
    options = {name: value for name, value in args.items() if name != AUTOPILOT_ENABLED}
    for name, value in options.items():
        want = AUTOPILOT_OPTIONS[name]
        if want is bool and not isinstance(value, bool):
            return f"{name!r} must be true or false, got {value!r}"
        if want is int and not (_is_int(value) and 0 <= value <= INT64_MAX):
            return f"{name!r} must be an integer >= 0, got {value!r}"
        if want is float and not _is_number(value):
            return f"{name!r} must be a finite number, got {value!r}"
    try:
        AutopilotOptions(**options).check()
    except ValueError as exc:
        return str(exc).removeprefix("autopilot: ")
    return None


def _set_autopilot(args: Mapping[str, Any]) -> None:
    problem = autopilot_problem(args)
    if problem is not None:
        raise invalid(f"set_autopilot: {problem}")


def _no_args(kind: str) -> Callable[[Mapping[str, Any]], None]:
    def check(args: Mapping[str, Any]) -> None:
        _fields(kind, args, ())

    return check


# The server's check of each of protocol.BUILTIN_COMMANDS (tests/test_vocabulary.py pins the two equal).
BUILTIN_KINDS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "reduce_lr": _reduce_lr,
    "set_lr": _set_lr,
    "set_hparams": _set_hparams,
    "skip_batches": _skip_batches,
    "rollback": _rollback,
    "checkpoint": _no_args("checkpoint"),
    "pause": _no_args("pause"),
    "resume": _no_args("resume"),
    "stop": _no_args("stop"),
    "set_autopilot": _set_autopilot,
}
