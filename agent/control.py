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
import threading
import time
import types
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trimtab import internal
from trimtab.builtin_commands import BUILTINS, Rejected
from trimtab.jsonsafe import to_json
from trimtab.lr import LrPlan, applied, number, on_host
from trimtab.protocol import APPLIED, BUILTIN_COMMANDS, DELIVERED, REJECTED, Command

if TYPE_CHECKING:
    from trimtab.lockstep import Lockstep

logger = logging.getLogger("trimtab")

REMEMBERED = 1000  # final results kept for redelivered ids
PAUSE_POLL_S = 0.5


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
        self.lr = LrPlan()  # what LR commands put in force (applied at optimizer.step, lr.py)
        self.boundary_step: int | None = None  # the step of the last boundary
        self._on_lr: Callable[[int, dict[int, float]], None] | None = None
        self._on_skipped: Callable[[int], None] | None = None
        self._lr_reported: int | None = None

    # ------------------------------------------------------------------ wiring (by Run)
    def attach(self, target: Target, snapshots: Any = None) -> None:
        """What the built-in commands act on (``run.watch``), and the snapshots for rollback."""
        self.target, self.snapshots = target, snapshots

    def detach(self) -> Target:
        """``run.unwatch``: nothing to act on any more; returns what was attached."""
        target, self.target, self.snapshots = self.target, Target(), None
        return target

    def use_lockstep(self, lockstep: Lockstep | None) -> None:
        """Multi-rank jobs: apply commands on every rank at the same step."""
        self.lockstep = lockstep

    def on_autopilot_policy(self, configure: Callable[[bool, dict[str, Any]], dict[str, Any]]) -> None:
        """What ``set_autopilot`` calls: (enabled, options) -> summary; ValueError/TypeError rejects."""
        self.configure_autopilot = configure

    def add_handler(self, kind: str, handler: Handler) -> None:
        self.handlers[kind] = handler

    def add_checkpoint_handler(self, handler: Callable[[int], Any]) -> None:
        self.checkpoint_handlers.append(handler)

    def add_rollback_handler(self, handler: Callable[[int], Any]) -> None:
        self.rollback_handlers.append(handler)

    def on_update_skipped(self, report: Callable[[int], None]) -> None:
        """Called at each boundary whose update is not applied (skip_batches, a rollback's
        step, the autopilot rejecting it)."""
        self._on_skipped = report

    def on_lr_used(self, report: Callable[[int, dict[int, float]], None]) -> None:
        """Called once per step from ``optimizer.step`` with each param group's LR that step
        updates with (the owner's LR with the plan applied)."""
        self._on_lr = report

    def report_lrs(self, optimizer: Any) -> None:
        step = self.boundary_step
        if self._on_lr is None or step is None or step == self._lr_reported:
            return
        self._lr_reported = step
        try:
            groups = optimizer.param_groups
            lrs = {i: self.lr.used(i, number(g["lr"])) for i, g in enumerate(groups) if on_host(g.get("lr"))}
            self._on_lr(step, lrs)
        except Exception as exc:
            internal.report("learning-rate report", exc)

    def drop_update(self) -> None:
        """This boundary's update is not applied (a rollback, the autopilot rejecting a step)."""
        self.drop_this_step = True

    def asked_to_skip(self) -> bool:
        """For loops that apply their own updates: is this step's update to be skipped?"""
        self.should_skip_used = True
        return self.skip_now

    # ------------------------------------------------------------------ network thread
    def receive(self, command: Command) -> None:
        """A ``cmd`` frame from the server: queue it, or answer again for a known id."""
        ident = command.id
        with self._cond:
            if ident in self._results:
                self._outgoing.append(self._results[ident])
                return
            if ident not in self._queued:
                if command.problem is not None:
                    self._finish(ident, REJECTED, None, {"reason": command.problem})
                    return
                self._queued.add(ident)
                self._inbox.append(command)
                self._cond.notify_all()
            self._outgoing.append({"id": ident, "status": DELIVERED, "step": None, "detail": None})

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
        self.boundary_step = step
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
        if self.skip_now and self._on_skipped is not None:
            try:
                self._on_skipped(step)
            except Exception as exc:
                internal.report("skipped-update report", exc)

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
            "status": APPLIED,
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
            status = APPLIED
        except Rejected as exc:
            status, detail = REJECTED, {"reason": str(exc)}
        except Exception as exc:  # a user handler (or our own code) failed: reject, train on
            status, detail = REJECTED, {"reason": f"{type(exc).__name__}: {exc}"}
            if command.kind in BUILTIN_COMMANDS:
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
        level = logger.info if status == APPLIED else logger.warning
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
        if kind not in BUILTIN_COMMANDS:
            raise ValueError(f"not a built-in command: {kind!r}")
        return self._run(Command("", kind, args), step)

    def _run(self, command: Command, step: int) -> dict[str, Any]:
        kind, args = command.kind, command.args
        builtin = BUILTINS.get(kind)
        if builtin is not None:
            return builtin(self, args, step)
        handler = self.handlers.get(kind)
        if handler is None:
            known = ", ".join(sorted(self.handlers)) or "none"
            raise Rejected(
                f"no handler for command {kind!r} in this process; register one with "
                f"run.on_command({kind!r}, fn) (registered: {known})"
            )
        return {"result": handler(args)}


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
        control.report_lrs(optimizer)  # the LR this step updates with (or would have)
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
        with applied(optimizer, control.lr):  # the LR commands' plan, on top of the owner's LR
            if closure is None:
                return original(*args, **kwargs)
            # The closure already ran once (for the boundary); the optimizer's first call gets
            # that result, later calls (LBFGS, SAM: several evaluations per step) run it for real.
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
