"""The built-in commands (``reduce_lr``, ``skip_batches``, ``rollback``, ...): each a function
of the :class:`~trimtab.control.Controller` (what it acts on, the state it changes), the
command's arguments and the step. A command that cannot be applied raises :class:`Rejected`
with the reason the server records. docs/commands.md describes each."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trimtab.jsonsafe import to_json
from trimtab.lr import owner_lrs, used_lrs

if TYPE_CHECKING:
    from trimtab.control import Controller


class Rejected(Exception):
    """A command cannot be applied; the message is the reason the server records."""


def _optimizer(control: Controller, kind: str) -> Any:
    if control.target.optimizer is None:
        raise Rejected(f"{kind} needs the optimizer: pass it to run.watch(model, optimizer, scheduler)")
    return control.target.optimizer


def reduce_lr(control: Controller, args: dict[str, Any], step: int) -> dict[str, Any]:
    factor = _number(args, "factor")
    if not 0 < factor < 1:
        raise Rejected(f"reduce_lr: factor must be in (0, 1), got {factor}")
    optimizer = _optimizer(control, "reduce_lr")
    before = used_lrs(optimizer, control.lr)
    if "min_lr" in args and args["min_lr"] is not None:
        min_lr = _number(args, "min_lr")
        top = max(before)
        if top <= min_lr:
            raise Rejected(f"reduce_lr: the LR {top:.6g} is already at or below min_lr {min_lr:.6g}")
        factor = max(factor, min_lr / top)  # the largest group LR stops at min_lr (as of now)
    control.lr.reduce(factor)
    after = used_lrs(optimizer, control.lr)
    return {"factor": factor, "before": before, "after": after, "lr_plan": control.lr.describe()}


def set_lr(control: Controller, args: dict[str, Any], step: int) -> dict[str, Any]:
    lr = _number(args, "lr")
    if not lr > 0:
        raise Rejected(f"set_lr: lr must be > 0, got {lr}")
    optimizer = _optimizer(control, "set_lr")
    before = used_lrs(optimizer, control.lr)
    control.lr.set(lr, owner_lrs(optimizer))  # in place of the owner's LR, until the next set_lr
    after = used_lrs(optimizer, control.lr)
    return {"before": before, "after": after, "lr_plan": control.lr.describe()}


def set_hparams(control: Controller, args: dict[str, Any], step: int) -> dict[str, Any]:
    optimizer = _optimizer(control, "set_hparams")
    if not args:
        raise Rejected("set_hparams: give at least one field, e.g. {'weight_decay': 0.1}")
    changes: dict[str, Any] = {}
    for name, value in args.items():
        if name in ("lr", "initial_lr", "params"):
            raise Rejected(f"set_hparams: {name!r} cannot be set here (use set_lr for the learning rate)")
        current = [group.get(name, _MISSING) for group in optimizer.param_groups]
        if any(c is _MISSING for c in current):
            fields = sorted(k for k in optimizer.param_groups[0] if k != "params")
            raise Rejected(f"set_hparams: {type(optimizer).__name__} has no {name!r}; its fields: {', '.join(fields)}")
        changes[name] = _coerce(name, value, current[0])
    before = {name: to_json(optimizer.param_groups[0][name]) for name in changes}
    for group in optimizer.param_groups:
        group.update(changes)
    return {"before": before, "after": to_json(changes)}


def skip_batches(control: Controller, args: dict[str, Any], step: int) -> dict[str, Any]:
    n = args.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise Rejected(f"skip_batches: n must be an integer >= 1, got {n!r}")
    if control.target.optimizer is None and not control.should_skip_used:
        raise Rejected(
            "skip_batches needs the optimizer (run.watch(model, optimizer)) or a loop that asks run.should_skip()"
        )
    control.skip_remaining += n
    return {"n": n, "from_step": step, "pending": control.skip_remaining}


def rollback(control: Controller, args: dict[str, Any], step: int) -> dict[str, Any]:
    if control.snapshots is None:
        raise Rejected("rollback: no snapshots are kept; enable them with run.watch(..., snapshot_every=K)")
    to_step = args.get("to_step")
    if to_step is not None and (not isinstance(to_step, int) or isinstance(to_step, bool) or to_step < 0):
        raise Rejected(f"rollback: to_step must be an integer >= 0, got {to_step!r}")
    if control.target.optimizer is not None:
        # lr/group* of this step: the LR its update would have used (the restore is about to
        # put the snapshot's LR in the param groups, and the update is dropped).
        control.report_lrs(control.target.optimizer)
    # Default: the newest snapshot before this step (one taken at this very boundary holds
    # the weights being rolled back from).
    restored = control.snapshots.restore(control.target, step - 1 if to_step is None else to_step)
    if restored is None:
        have = control.snapshots.steps()
        raise Rejected(f"rollback: no snapshot at or before step {to_step}; kept: {have or 'none yet'}")
    # This step's gradients come from the weights being replaced: its update is dropped.
    control.drop_update()
    handled = [to_json(fn(restored)) for fn in control.rollback_handlers]
    # The optimizer and scheduler state came back too, with the owner's LR of that time; the
    # LR commands' plan lives in the process and stays. Say what the LR is now.
    lrs = used_lrs(control.target.optimizer, control.lr) if control.target.optimizer is not None else None
    return {"restored_step": restored, "requested": to_step, "lr_after": lrs, "handlers": handled}


def checkpoint(control: Controller, args: dict[str, Any], step: int) -> dict[str, Any]:
    if not control.checkpoint_handlers:
        raise Rejected("checkpoint: no checkpoint handler registered; use run.on_checkpoint(fn)")
    return {"results": [to_json(fn(step)) for fn in control.checkpoint_handlers]}


def pause(control: Controller, args: dict[str, Any], step: int) -> dict[str, Any]:
    was = control.paused
    control.paused = True
    return {"paused": True, "was_paused": was}


def resume(control: Controller, args: dict[str, Any], step: int) -> dict[str, Any]:
    if not control.paused:
        raise Rejected("resume: the run is not paused")
    control.paused = False
    return {"paused": False}


def set_autopilot(control: Controller, args: dict[str, Any], step: int) -> dict[str, Any]:
    """A policy from the server: ``{"enabled": bool, <AutopilotOptions field>: value, ...}``."""
    if control.configure_autopilot is None:
        raise Rejected("set_autopilot: this process cannot run an autopilot")
    options = dict(args)
    enabled = options.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise Rejected(f"set_autopilot: enabled must be true or false, got {enabled!r}")
    try:
        return control.configure_autopilot(enabled, options)
    except (TypeError, ValueError) as exc:
        raise Rejected(f"set_autopilot: {exc}") from None


def stop(control: Controller, args: dict[str, Any], step: int) -> dict[str, Any]:
    control.stop_requested = True
    control.paused = False
    results = []
    for fn in control.checkpoint_handlers:
        try:
            results.append(to_json(fn(step)))
        except Exception as exc:  # the stop still happens; the failure is reported
            results.append({"error": f"{type(exc).__name__}: {exc}"})
    return {"stopping": True, "checkpoints": results}


Builtin = Callable[["Controller", dict[str, Any], int], dict[str, Any]]
# One implementation per protocol.BUILTIN_COMMANDS entry (tests/test_vocabulary.py pins it).
BUILTINS: dict[str, Builtin] = {
    "reduce_lr": reduce_lr,
    "set_lr": set_lr,
    "set_hparams": set_hparams,
    "skip_batches": skip_batches,
    "rollback": rollback,
    "checkpoint": checkpoint,
    "pause": pause,
    "resume": resume,
    "stop": stop,
    "set_autopilot": set_autopilot,
}

_MISSING = object()


def _number(args: dict[str, Any], name: str) -> float:
    value = args.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Rejected(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _coerce(name: str, value: Any, current: Any) -> Any:
    """``value`` in the shape of the field's current value, or Rejected."""
    if isinstance(current, bool) or current is None:
        raise Rejected(f"set_hparams: {name!r} is not a numeric hyper-parameter")
    if isinstance(current, (tuple, list)):
        if (
            not isinstance(value, (list, tuple))
            or len(value) != len(current)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        ):
            raise Rejected(f"set_hparams: {name!r} must be a list of {len(current)} finite numbers, got {value!r}")
        return type(current)(float(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Rejected(f"set_hparams: {name!r} must be a finite number, got {value!r}")
    return float(value) if isinstance(current, float) else value
