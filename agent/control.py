"""Commands from the server, applied on the training thread at a step boundary.

The sender thread hands each ``cmd`` frame to :meth:`Controller.receive`, which queues it and
answers ``delivered``. The training thread calls :meth:`Controller.boundary` from
``run.step`` (after ``backward``, before ``optimizer.step``): queued commands are applied
there, in arrival order, and each gets a final ``applied`` or ``rejected`` result with the
step and a before/after summary. Nothing here runs a command from the network thread, and
nothing raises into the training loop: a failing command, built-in or the user's, is
rejected with its reason and training goes on.

A command id is applied at most once: a redelivered id (after a reconnect) gets its stored
result again.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import types
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trimtab import internal
from trimtab.jsonsafe import to_json
from trimtab.lr import current_lrs, scale_lr

if TYPE_CHECKING:
    from trimtab.lockstep import Lockstep

logger = logging.getLogger("trimtab")

BUILTIN = (
    "reduce_lr",
    "set_lr",
    "set_hparams",
    "skip_batches",
    "rollback",
    "checkpoint",
    "pause",
    "resume",
    "stop",
    "set_autopilot",
)
REMEMBERED = 1000  # final results kept for redelivered ids
PAUSE_POLL_S = 0.5


class Rejected(Exception):
    """A command cannot be applied; the message is the reason the server records."""


@dataclass(frozen=True)
class Command:
    id: str
    kind: str
    args: dict[str, Any]


@dataclass
class Target:
    """What the built-in commands act on (given by ``run.watch``)."""

    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None


Handler = Callable[[dict[str, Any]], Any]


class Controller:
    def __init__(self, on_result: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._cond = threading.Condition()
        self._inbox: deque[Command] = deque()
        self._queued: set[str] = set()
        self._results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._outgoing: deque[dict[str, Any]] = deque()
        self._autopilot: deque[dict[str, Any]] = deque(maxlen=REMEMBERED)
        self.history: deque[dict[str, Any]] = deque(maxlen=REMEMBERED)  # final results, with kind and args
        # Run's hook for set_autopilot: (enabled, options) -> summary; ValueError/TypeError = rejected
        self.configure_autopilot: Callable[[bool, dict[str, Any]], dict[str, Any]] | None = None
        self._on_result = on_result
        self.handlers: dict[str, Handler] = {}
        self.checkpoint_handlers: list[Callable[[int], Any]] = []
        self.rollback_handlers: list[Callable[[int], Any]] = []
        self.target = Target()
        self.snapshots: Any = None  # trimtab.snapshots.Snapshots when enabled
        self.skip_remaining = 0  # skip_batches: updates still to skip, from the next boundary on
        self.drop_this_step = False  # rollback, autopilot: this boundary's update is not applied
        self.skip_now = False  # this step's update is not applied
        self.should_skip_used = False
        self.stop_requested = False
        self.paused = False
        self.released = False  # finish() ended any pause for good
        self.lockstep: Lockstep | None = None  # multi-rank: same-step application via the c10d store
        self._scheduled: list[tuple[int, Command]] = []

    # ------------------------------------------------------------------ network thread
    def receive(self, frame: dict[str, Any]) -> None:
        """A ``cmd`` frame from the server: queue it, or answer again for a known id."""
        ident, kind, args = frame.get("id"), frame.get("kind"), frame.get("args")
        if not isinstance(ident, str) or not ident:
            logger.warning("trimtab: ignoring a command without an id: %r", frame)
            return
        with self._cond:
            if ident in self._results:
                self._outgoing.append(self._results[ident])
                return
            if ident not in self._queued:
                if not isinstance(kind, str) or not isinstance(args, (dict, type(None))):
                    self._finish(
                        ident, "rejected", None, {"reason": "malformed command: kind must be a string, args a map"}
                    )
                    return
                self._queued.add(ident)
                self._inbox.append(Command(ident, kind, dict(args or {})))
                self._cond.notify_all()
            self._outgoing.append({"id": ident, "status": "delivered", "step": None, "detail": None})

    def take_outgoing(self) -> list[dict[str, Any]]:
        """Result frames for the sender to send (it calls this on every turn)."""
        with self._cond:
            out = list(self._outgoing)
            self._outgoing.clear()
        return out

    def on_reconnect(self) -> None:
        """Automatic actions are resent on every new connection (the server ignores
        duplicates): the server never asks for them again, as it does for its own commands."""
        with self._cond:
            self._outgoing.extend(self._autopilot)

    # ------------------------------------------------------------------ training thread
    def boundary(self, step: int, autopilot: Callable[[int], None] | None = None) -> None:
        """Apply what is queued; wait here while paused; let the autopilot act; decide
        whether this step's update is skipped."""
        self.skip_now = False
        self._apply_queued(step)
        while self.paused and not self.stop_requested and not self.released:
            with self._cond:
                if not self._inbox:
                    self._cond.wait(PAUSE_POLL_S)
            self._apply_queued(step)
        if autopilot is not None:
            autopilot(step)
        if self.drop_this_step:
            self.skip_now, self.drop_this_step = True, False  # one reason to drop it is enough
        elif self.skip_remaining > 0:
            self.skip_now = True
            self.skip_remaining -= 1

    def release(self) -> None:
        """The run is finishing: end a pause (the training thread must not wait forever)."""
        with self._cond:
            self.paused = False
            self.released = True
            self._cond.notify_all()

    def record_automatic(self, ident: str, kind: str, args: dict[str, Any], step: int, detail: dict[str, Any]) -> None:
        """An action the agent took on its own (autopilot), reported like a command."""
        frame = {
            "id": ident,
            "status": "applied",
            "step": step,
            "detail": {**detail, "source": "autopilot", "kind": kind, "args": args},
        }
        with self._cond:
            self._autopilot.append(frame)
            self._outgoing.append(frame)
        entry = {**frame, "kind": kind, "args": args}
        self.history.append(entry)
        if self._on_result is not None:
            self._on_result(entry)

    def _apply_queued(self, step: int) -> None:
        if self.lockstep is not None:
            self._apply_lockstep(step)
            return
        while True:
            with self._cond:
                if not self._inbox:
                    return
                command = self._inbox.popleft()
            self._apply(command, step)

    def _apply_lockstep(self, step: int) -> None:
        """Multi-rank: rank 0 schedules what it received; every rank applies the schedule."""
        lockstep = self.lockstep
        assert lockstep is not None
        with self._cond:
            received = list(self._inbox)
            self._inbox.clear()  # on other ranks the store, not the inbox, says what to apply
        try:
            if lockstep.leader and received:
                lockstep.publish(received, step if self.paused else step + 1)
            self._scheduled.extend(lockstep.poll())
        except Exception as exc:  # the store failed: keep what was received, try next step
            with self._cond:
                self._inbox.extendleft(reversed(received))
            internal.report("command schedule (c10d store)", exc)
            return
        due = [entry for entry in self._scheduled if entry[0] <= step]
        self._scheduled = [entry for entry in self._scheduled if entry[0] > step]
        for apply_at, command in due:
            if command.id not in self._results:
                self._apply(command, step, late=step - apply_at)

    def _apply(self, command: Command, step: int, late: int = 0) -> None:
        started = time.perf_counter()
        try:
            detail = self._run(command, step)
            status = "applied"
        except Rejected as exc:
            status, detail = "rejected", {"reason": str(exc)}
        except Exception as exc:  # a user handler (or our own code) failed: reject, train on
            status, detail = "rejected", {"reason": f"{type(exc).__name__}: {exc}"}
            if command.kind in BUILTIN:
                internal.report(f"command {command.kind}", exc)
            else:
                logger.warning(
                    "trimtab: the handler for command %r raised %s: %s", command.kind, type(exc).__name__, exc
                )
        detail = {**(detail or {}), "apply_ms": round(1000 * (time.perf_counter() - started), 3)}
        if late:
            detail["late_steps"] = late  # this rank found rank 0's schedule after its step
        with self._cond:
            self._queued.discard(command.id)
            frame = self._finish(command.id, status, step, detail)
        level = logger.info if status == "applied" else logger.warning
        level("trimtab: command %s %s at step %d: %s", command.kind, status, step, detail)
        entry = {**frame, "kind": command.kind, "args": command.args}
        self.history.append(entry)
        if self._on_result is not None:
            self._on_result(entry)

    def _finish(self, ident: str, status: str, step: int | None, detail: dict[str, Any]) -> dict[str, Any]:
        frame = {"id": ident, "status": status, "step": step, "detail": to_json(detail)}
        self._results[ident] = frame
        while len(self._results) > REMEMBERED:
            self._results.popitem(last=False)
        self._outgoing.append(frame)
        return frame

    # ------------------------------------------------------------------ the commands
    def run_builtin(self, kind: str, args: dict[str, Any], step: int) -> dict[str, Any]:
        """Apply a built-in command now (the autopilot's way in); Rejected when it cannot."""
        if kind not in BUILTIN:
            raise ValueError(f"not a built-in command: {kind!r}")
        return self._run(Command("", kind, args), step)

    def _run(self, command: Command, step: int) -> dict[str, Any]:
        kind, args = command.kind, command.args
        builtin = {
            "reduce_lr": self._reduce_lr,
            "set_lr": self._set_lr,
            "set_hparams": self._set_hparams,
            "skip_batches": self._skip_batches,
            "rollback": self._rollback,
            "checkpoint": self._checkpoint,
            "pause": self._pause,
            "resume": self._resume,
            "stop": self._stop,
            "set_autopilot": self._set_autopilot,
        }.get(kind)
        if builtin is not None:
            return builtin(args, step)
        handler = self.handlers.get(kind)
        if handler is None:
            known = ", ".join(sorted(self.handlers)) or "none"
            raise Rejected(
                f"no handler for command {kind!r} in this process; register one with "
                f"run.on_command({kind!r}, fn) (registered: {known})"
            )
        return {"result": handler(args)}

    def _optimizer(self, kind: str) -> Any:
        if self.target.optimizer is None:
            raise Rejected(f"{kind} needs the optimizer: pass it to run.watch(model, optimizer, scheduler)")
        return self.target.optimizer

    def _reduce_lr(self, args: dict[str, Any], step: int) -> dict[str, Any]:
        factor = _number(args, "factor")
        if not 0 < factor < 1:
            raise Rejected(f"reduce_lr: factor must be in (0, 1), got {factor}")
        optimizer = self._optimizer("reduce_lr")
        before = current_lrs(optimizer)
        if "min_lr" in args and args["min_lr"] is not None:
            min_lr = _number(args, "min_lr")
            top = max(before)
            if top <= min_lr:
                raise Rejected(f"reduce_lr: the LR {top:.6g} is already at or below min_lr {min_lr:.6g}")
            factor = max(factor, min_lr / top)  # the largest group LR stops at min_lr
        scale_lr(optimizer, self.target.scheduler, factor)
        return {"factor": factor, "before": before, "after": current_lrs(optimizer)}

    def _set_lr(self, args: dict[str, Any], step: int) -> dict[str, Any]:
        lr = _number(args, "lr")
        if not lr > 0:
            raise Rejected(f"set_lr: lr must be > 0, got {lr}")
        optimizer = self._optimizer("set_lr")
        before = current_lrs(optimizer)
        if before[0] <= 0:
            raise Rejected("set_lr: group 0's LR is 0 right now (warm-up start?), so there is nothing to scale from")
        factor = lr / before[0]  # every group and the schedule scale alike: ratios and shape stay
        scale_lr(optimizer, self.target.scheduler, factor)
        return {"factor": factor, "before": before, "after": current_lrs(optimizer)}

    def _set_hparams(self, args: dict[str, Any], step: int) -> dict[str, Any]:
        optimizer = self._optimizer("set_hparams")
        if not args:
            raise Rejected("set_hparams: give at least one field, e.g. {'weight_decay': 0.1}")
        changes: dict[str, Any] = {}
        for name, value in args.items():
            if name in ("lr", "initial_lr", "params"):
                raise Rejected(f"set_hparams: {name!r} cannot be set here (use set_lr for the learning rate)")
            current = [group.get(name, _MISSING) for group in optimizer.param_groups]
            if any(c is _MISSING for c in current):
                fields = sorted(k for k in optimizer.param_groups[0] if k != "params")
                raise Rejected(
                    f"set_hparams: {type(optimizer).__name__} has no {name!r}; its fields: {', '.join(fields)}"
                )
            changes[name] = _coerce(name, value, current[0])
        before = {name: to_json(optimizer.param_groups[0][name]) for name in changes}
        for group in optimizer.param_groups:
            group.update(changes)
        return {"before": before, "after": to_json(changes)}

    def _skip_batches(self, args: dict[str, Any], step: int) -> dict[str, Any]:
        n = args.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise Rejected(f"skip_batches: n must be an integer >= 1, got {n!r}")
        if self.target.optimizer is None and not self.should_skip_used:
            raise Rejected(
                "skip_batches needs the optimizer (run.watch(model, optimizer)) or a loop that asks run.should_skip()"
            )
        self.skip_remaining += n
        return {"n": n, "from_step": step, "pending": self.skip_remaining}

    def _rollback(self, args: dict[str, Any], step: int) -> dict[str, Any]:
        if self.snapshots is None:
            raise Rejected("rollback: no snapshots are kept; enable them with run.watch(..., snapshot_every=K)")
        to_step = args.get("to_step")
        if to_step is not None and (not isinstance(to_step, int) or isinstance(to_step, bool) or to_step < 0):
            raise Rejected(f"rollback: to_step must be an integer >= 0, got {to_step!r}")
        # Default: the newest snapshot before this step (one taken at this very boundary holds
        # the weights being rolled back from).
        restored = self.snapshots.restore(self.target, step - 1 if to_step is None else to_step)
        if restored is None:
            have = self.snapshots.steps()
            raise Rejected(f"rollback: no snapshot at or before step {to_step}; kept: {have or 'none yet'}")
        # This step's gradients come from the weights being replaced: its update is dropped.
        self.drop_this_step = True
        handled = [to_json(fn(restored)) for fn in self.rollback_handlers]
        # The optimizer and scheduler state came back too: LR changes made after the snapshot
        # (by commands or by hand) are undone. Say what the LR is now.
        lrs = current_lrs(self.target.optimizer) if self.target.optimizer is not None else None
        return {"restored_step": restored, "requested": to_step, "lr_after": lrs, "handlers": handled}

    def _checkpoint(self, args: dict[str, Any], step: int) -> dict[str, Any]:
        if not self.checkpoint_handlers:
            raise Rejected("checkpoint: no checkpoint handler registered; use run.on_checkpoint(fn)")
        return {"results": [to_json(fn(step)) for fn in self.checkpoint_handlers]}

    def _pause(self, args: dict[str, Any], step: int) -> dict[str, Any]:
        was = self.paused
        self.paused = True
        return {"paused": True, "was_paused": was}

    def _resume(self, args: dict[str, Any], step: int) -> dict[str, Any]:
        if not self.paused:
            raise Rejected("resume: the run is not paused")
        self.paused = False
        return {"paused": False}

    def _set_autopilot(self, args: dict[str, Any], step: int) -> dict[str, Any]:
        """A policy from the server: ``{"enabled": bool, <AutopilotOptions field>: value, ...}``."""
        if self.configure_autopilot is None:
            raise Rejected("set_autopilot: this process cannot run an autopilot")
        options = dict(args)
        enabled = options.pop("enabled", True)
        if not isinstance(enabled, bool):
            raise Rejected(f"set_autopilot: enabled must be true or false, got {enabled!r}")
        try:
            return self.configure_autopilot(enabled, options)
        except (TypeError, ValueError) as exc:
            raise Rejected(f"set_autopilot: {exc}") from None

    def _stop(self, args: dict[str, Any], step: int) -> dict[str, Any]:
        self.stop_requested = True
        self.paused = False
        results = []
        for fn in self.checkpoint_handlers:
            try:
                results.append(to_json(fn(step)))
            except Exception as exc:  # the stop still happens; the failure is reported
                results.append({"error": f"{type(exc).__name__}: {exc}"})
        return {"stopping": True, "checkpoints": results}


_MISSING = object()


def wrap_optimizer_step(optimizer: Any, control: Controller) -> None:
    """Make ``optimizer.step`` apply no update while ``control.skip_now`` (the optimizer state
    stays untouched, gradients are zeroed). With a closure (Lightning calls ``step(closure)``
    and reaches the step boundary inside it), the closure runs first, then the decision."""
    original = optimizer.step
    if getattr(original, "_trimtab_original", None) is not None:
        return

    @functools.wraps(original)  # keeps the LR scheduler's marker on the method
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        closure = kwargs.pop("closure", None)
        if closure is None and args:
            closure, args = args[0], args[1:]
        result = None
        if closure is not None:
            import torch

            with torch.enable_grad():
                result = closure()
        if control.skip_now:
            control.skip_now = False  # one update per skipped step
            try:
                optimizer.zero_grad(set_to_none=True)
            except TypeError:  # an optimizer whose zero_grad takes no argument
                optimizer.zero_grad()
            # What torch's LR-scheduler wrapper records on a real call: a skipped first step
            # is still a step, not a scheduler called "before optimizer.step()".
            optimizer._opt_called = True
            return result
        if closure is None:
            return original(*args, **kwargs)
        # The closure already ran once (for the boundary); the optimizer's first call gets that
        # result, later calls (LBFGS, SAM: several evaluations per step) run it for real.
        first = [True]

        def again() -> Any:
            if first[0]:
                first[0] = False
                return result
            return closure()

        return original(*args, closure=again, **kwargs)

    step._trimtab_original = original  # type: ignore[attr-defined]
    # A bound method, as torch's own: an LR scheduler created later wraps ``step.__func__``.
    optimizer.step = types.MethodType(step, optimizer)


def unwrap_optimizer_step(optimizer: Any) -> None:
    original = getattr(optimizer.step, "_trimtab_original", None)
    if original is not None:
        optimizer.step = original


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
