"""``Run``: what a training script holds. ``log`` is the hot path; everything else is setup."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from trimtab import internal
from trimtab.buffer import Buffer, Drops, is_integral, to_number
from trimtab.control import Controller, Target, unwrap_optimizer_step, wrap_optimizer_step
from trimtab.jsonsafe import to_json
from trimtab.lr import used_lrs
from trimtab.options import Options
from trimtab.orphans import replay_orphans
from trimtab.protocol import (
    APPLIED,
    BUILTIN_COMMANDS,
    EVENT_COMMAND,
    MAX_NAME_LENGTH,
    MAX_PROJECT_LENGTH,
)
from trimtab.ranks import lockstep_for, run_uid
from trimtab.run_sink import RunSink
from trimtab.sender import BYE_WAIT, OFFLINE_FINISH_GRACE, Identity, Sender
from trimtab.session import Session
from trimtab.spool import Spool, SpoolLocked
from trimtab.version import __version__

if TYPE_CHECKING:
    from trimtab.autopilot import Autopilot
    from trimtab.watch import Watcher

logger = logging.getLogger("trimtab")

_live_runs: weakref.WeakSet[Run] = weakref.WeakSet()


class Run:
    """One training run streaming to a trimtab server.

    Create it with :func:`trimtab.init`. ``log`` never blocks and never raises; ``finish``
    flushes (also called at interpreter exit and by ``with``).
    """

    def __init__(self, opts: Options) -> None:
        self.options = opts
        self.uid = run_uid(opts)
        self._pid = os.getpid()
        self._closed = False
        self._next_step = opts.start_step
        self._train_step: int | None = None  # the last step given to run.step
        self._watcher: Watcher | None = None
        self._id: int | None = None
        self._id_known = threading.Event()
        self.drops = Drops()
        self._buffer = Buffer(opts.max_queue, self.drops)
        self._warned: set[str] = set()
        self.identity = Identity(
            uid=self.uid,
            project=self._checked_text("project", opts.project or "default", MAX_PROJECT_LENGTH),
            name=None if opts.name is None else self._checked_text("name", opts.name, MAX_NAME_LENGTH),
            agent_version=__version__,
            config=to_json(dict(opts.config)),
            rank=opts.rank,
            world_size=opts.world_size,
            started_at=time.time(),
        )
        self._control = Controller(on_result=self._command_event)
        self._control.use_lockstep(lockstep_for(opts, self.uid))
        self._control.on_autopilot_policy(self._configure_autopilot)
        self._control.on_lr_used(self._log_lrs)
        self._control.on_update_skipped(lambda step: self._put_scalars(step, time.time(), {"update_skipped": 1.0}))
        self._autopilot: Autopilot | None = None
        spool = self._open_spool()
        self._sender = Sender(
            opts,
            self.identity,
            Session(window=opts.window),
            spool,
            self.drops,
            buffer=self._buffer,
            on_run_id=self._set_id,
            control=self._control,
        )
        self._replays: list[Sender] = []
        self._sender.start()
        self._scan: threading.Thread | None = None
        if opts.replay_orphans and opts.spool_path is not None:
            self._scan = threading.Thread(
                target=replay_orphans, args=(opts, self.uid, self._replays.append), name="trimtab-replay", daemon=True
            )
            self._scan.start()
        _live_runs.add(self)
        atexit.register(_finish_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ public API
    @property
    def id(self) -> int | None:
        """The server's id for this run, once the server has said it (None before)."""
        return self._id

    def wait_for_id(self, timeout: float | None = None) -> int | None:
        """Block (outside the training loop!) until the server has assigned the run id."""
        self._id_known.wait(timeout)
        return self._id

    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        """Queue scalars for ``step``. Never blocks or raises. Without ``step``: the step of the last
        :meth:`step` call, or before any, the previous ``log`` step + 1.

        Values may be floats, ints, bools, numpy scalars or 0-d torch tensors. A tensor on an
        accelerator is read by the sender thread, so ``log`` itself never synchronises.
        """
        try:
            if self._closed:  # also set in a forked child, by the register_at_fork hook below
                return
            if step is None:
                step = self._next_step if self._train_step is None else self._train_step
            elif type(step) is not int:
                if not is_integral(step):
                    self.drops.add("bad_step", len(data))
                    self._warn_once("step", f"step must be an int, got {type(step).__name__}; points dropped")
                    return
                step = int(step)
            self._next_step = step + 1
            record = None
            for value in data.values():
                kind = type(value)
                if kind is not float and kind is not int:
                    record = self._sanitize(data)
                    break
            if record is None:
                record = dict(data)
            elif not record:
                return  # every value was dropped (and counted) by _sanitize
            self._put_scalars(step, time.time(), record)
        except Exception as exc:
            if not isinstance(data, Mapping):
                self.drops.add("bad_data")
                self._warn_once("data", f"log() takes a mapping of key to number, got {type(data).__name__}; ignored")
                return
            internal.report("Run.log", exc)

    def watch(
        self,
        model: Any,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        *,
        snapshot_every: int | None = None,
        snapshot_keep: int = 3,
        snapshot_dir: str | os.PathLike[str] | None = None,
        **cadence: Any,
    ) -> None:
        """Measure ``model`` on every :meth:`step`: gradient norms, learning rates, loss scale,
        timing, and every ``sample_every`` steps (100) weight norms, update ratios, weight,
        gradient and activation histograms. See ``trimtab.watch.WatchOptions`` for the
        keyword arguments. Problems with the model are logged once; training goes on.

        The optimizer, scheduler and scaler are also what commands act on (``reduce_lr``,
        ``skip_batches``, ...; docs/commands.md): ``optimizer.step`` is wrapped so that a
        skipped step applies no update. ``snapshot_every=K`` keeps the newest
        ``snapshot_keep`` snapshots (model, optimizer, scheduler, scaler, RNG) taken every K
        steps, on the CPU or in ``snapshot_dir``, for ``rollback``.
        """
        from trimtab.watch import Watcher, WatchOptions

        opts = WatchOptions(**cadence)  # a typo in an option is a TypeError, like init's
        opts.check()
        snapshots = None
        if snapshot_every is not None:
            from trimtab.snapshots import Snapshots

            snapshots = Snapshots(snapshot_every, snapshot_keep, snapshot_dir)  # bad values: ValueError
        try:
            import torch

            if self._closed:
                return
            if self._watcher is not None:
                self._warn_once("watch-twice", "run.watch: this run already watches a model; the new call is ignored")
                return
            if not isinstance(model, torch.nn.Module):
                self._warn_once("watch-type", f"run.watch needs a torch.nn.Module, got {type(model).__name__}")
                return
            inner = getattr(model, "module", None)
            if isinstance(model, torch.nn.parallel.DistributedDataParallel) and isinstance(inner, torch.nn.Module):
                model = inner  # names without "module.", and a replay that runs no collective
            if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
                self._warn_once("watch-opt", f"run.watch: {type(optimizer).__name__} is not a torch Optimizer; ignored")
                optimizer = None
            next_step = self.options.start_step if self._train_step is None else self._train_step + 1
            self._watcher = Watcher(self._sink, model, optimizer, scheduler, scaler, opts, next_step)
            self._control.attach(Target(model, optimizer, scheduler, scaler), snapshots)
            if optimizer is not None:
                wrap_optimizer_step(optimizer, self._control)
        except Exception as exc:
            internal.report("Run.watch", exc)

    def unwatch(self) -> None:
        """Stop measuring the watched model: hooks are removed, pending statistics are sent,
        ``optimizer.step`` is unwrapped. Commands that need the optimizer are rejected after."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            try:
                watcher.close()
            except Exception as exc:
                internal.report("Run.unwatch", exc)
        target = self._control.detach()
        if target.optimizer is not None:
            try:
                unwrap_optimizer_step(target.optimizer)
            except Exception as exc:
                internal.report("Run.unwatch", exc)

    # ------------------------------------------------------------------ control
    def on_command(self, kind: str, handler: Callable[[dict[str, Any]], Any]) -> None:
        """Run ``handler(args)`` on the training thread, at a step boundary, when a command of
        ``kind`` arrives; its return value (JSON-safe) goes back with the acknowledgement. If it
        raises, the command is rejected with the error and training goes on."""
        if not isinstance(kind, str) or not kind or kind in BUILTIN_COMMANDS:
            raise ValueError(f"on_command: {kind!r} is empty or a built-in command ({', '.join(BUILTIN_COMMANDS)})")
        if not callable(handler):
            raise TypeError("on_command: handler must be callable")
        self._control.add_handler(kind, handler)

    def on_checkpoint(self, handler: Callable[[int], Any]) -> None:
        """``handler(step)`` saves a checkpoint: run by the ``checkpoint`` command and before
        ``stop`` takes effect."""
        self._control.add_checkpoint_handler(handler)

    def on_rollback(self, handler: Callable[[int], Any]) -> None:
        """``handler(restored_step)`` after a ``rollback``: move your data position (see
        docs/commands.md); the model, optimizer, scheduler and RNG are already restored."""
        self._control.add_rollback_handler(handler)

    def autopilot(self, enabled: bool = True, **options: Any) -> None:
        """Let the agent act on its own at step boundaries: reject the update of a non-finite
        or severely spiking step (capped), reduce the LR on sustained instability, roll back
        on divergence when snapshots are kept. Options: ``trimtab.autopilot.AutopilotOptions``
        (an unknown one is a TypeError); ``autopilot(False)`` turns it off. Every action is
        reported to the server like a command, marked automatic."""
        from trimtab.autopilot import Autopilot, AutopilotOptions

        if not enabled:
            self._autopilot = None
            return
        opts = AutopilotOptions(**options)
        self._autopilot = Autopilot(
            self._control, opts, self.identity.world_size, self.uid, connected=self._sender.connected.is_set
        )

    def _configure_autopilot(self, enabled: bool, options: dict[str, Any]) -> dict[str, Any]:
        """The ``set_autopilot`` command (a policy pushed by the server), on the training thread."""
        from trimtab.autopilot import AutopilotOptions

        AutopilotOptions.check_names(options)
        self.autopilot(enabled, **options)
        return {"enabled": enabled, "options": options}

    def learning_rates(self) -> list[float]:
        """The LR each param group of the watched optimizer updates with: the LR your script,
        scheduler or framework set, with the LR commands in force applied (``reduce_lr``,
        ``set_lr``, the autopilot's cuts; docs/control.md). Empty before ``run.watch(model,
        optimizer)``. What ``lr/group<i>`` records for each step."""
        optimizer = self._control.target.optimizer
        if optimizer is None:
            return []
        try:
            return used_lrs(optimizer, self._control.lr)
        except Exception as exc:
            internal.report("Run.learning_rates", exc)
            return []

    def command_history(self) -> list[dict[str, Any]]:
        """The commands this process applied or rejected, oldest first (the last 1000): id,
        kind, args, status, step, detail; the autopilot's have ``detail.source == "autopilot"``."""
        return list(self._control.history)

    def should_stop(self) -> bool:
        """True once a ``stop`` command was applied: end training cleanly."""
        return self._control.stop_requested

    def should_skip(self) -> bool:
        """True when this step's update must not be applied (``skip_batches``, ``rollback``).
        Only needed by loops that do not give their optimizer to ``run.watch``."""
        return self._control.asked_to_skip()

    def step(
        self, loss: Any = None, *, step: int | None = None, batch_size: int | None = None, tokens: int | None = None
    ) -> None:
        """Record one optimizer step: call it after ``backward()`` (and after ``scaler.unscale_``
        if you clip), before ``optimizer.step()`` and ``zero_grad()``. ``loss`` may be a tensor
        on any device; it is never synchronised. Never blocks or raises.

        ``step`` defaults to the previous step + 1 (first: ``trimtab.init(start_step=...)``,
        0 unless a script resuming from a checkpoint says otherwise); ``batch_size`` and
        ``tokens`` (per optimizer step) give throughput. After ``step``, ``log`` without a step logs at it.
        """
        try:
            if self._closed:
                return
            if step is None:
                step = self.options.start_step if self._train_step is None else self._train_step + 1
            elif not is_integral(step):
                self._warn_once("step", f"step must be an int, got {type(step).__name__}; step ignored")
                return
            step = int(step)
            self._train_step = step
            if self._watcher is None:
                self._warn_once("no-watch", "run.step without run.watch(model, optimizer): only the loss is logged")
                if loss is not None:
                    self.log({"loss": loss}, step=step)
            else:
                self._watcher.step(loss, step, batch_size, tokens)
        except Exception as exc:
            internal.report("Run.step", exc)
        self._boundary(step, loss)

    def _autopilot_step(self, step: int, loss: Any) -> None:
        if self._autopilot is not None:
            self._autopilot.decide_from(step, self._watcher, loss)

    def _boundary(self, step: int | None, loss: Any = None) -> None:
        """The step boundary: take a due snapshot, apply queued commands (waiting here while
        paused)."""
        if step is None or self._closed:
            return
        control = self._control
        try:
            if control.snapshots is not None:
                control.snapshots.maybe_take(step, control.target)
        except Exception as exc:
            internal.report("snapshot", exc)

        def autopilot(at: int) -> None:
            try:
                self._autopilot_step(at, loss)
            except Exception as exc:
                internal.report("autopilot", exc)

        try:
            control.boundary(step, autopilot if self._autopilot is not None else None)
        except Exception as exc:
            internal.report("commands", exc)

    @property
    def rank(self) -> int:
        return self.identity.rank

    def finish(self, timeout: float | None = None) -> bool:
        """Flush everything and end the run. True when the server acknowledged every batch and
        confirmed the run finished.

        Waits at most ``timeout`` (default ``finish_timeout``); while the server is unreachable
        it gives up after 5 s, since everything is already in the disk spool. Whatever is not
        acknowledged stays there, and the next ``trimtab.init`` on this machine replays it.
        """
        if self._closed or os.getpid() != self._pid:
            return False
        self._control.release()  # a paused training thread must not wait forever
        self.unwatch()  # statistics still being copied from the device go out with the rest
        self._closed = True
        timeout = self.options.finish_timeout if timeout is None else timeout
        try:
            now = time.monotonic()
            deadline, offline_deadline = now + timeout, now + min(timeout, OFFLINE_FINISH_GRACE)
            if self._scan is not None:  # let the orphan scan start its replays, so they are finished too
                self._scan.join(max(0.0, deadline - now))
            spool = self._sender.spool
            if spool is not None:  # should this end unacknowledged, a later replay ends the run then
                with contextlib.suppress(OSError):
                    spool.write_meta({**self._meta(), "finished_at": time.time()})
            senders = [self._sender, *self._replays]
            for sender in senders:  # all stop together: one grace period, not one each
                sender.request_stop(deadline, offline_deadline)
            ok = self._sender.join(deadline + BYE_WAIT + 1.0 - time.monotonic())
            for replay in self._replays:
                replay.join(deadline + 1.0 - time.monotonic())
            return ok
        except Exception as exc:
            internal.report("Run.finish", exc)
            return False

    def stats(self) -> dict[str, Any]:
        """Live counters: drops by reason, batches awaiting ack, connection state."""
        return {
            "drops": self.drops.snapshot(),
            "unacked_batches": len(self._sender.session.unacked),
            "queued_records": len(self._buffer),
            "connected": self._sender.connected.is_set(),
        }

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish()

    # ------------------------------------------------------------------ internals
    @property
    def _sink(self) -> RunSink:
        return RunSink(self)

    def _put_scalars(self, step: int, wall: float, record: dict[str, Any]) -> None:
        if not self._buffer.put((step, wall, record)):
            self.drops.add("queue_full", len(record))
            self._warn_once("queue", "log queue is full (the sender cannot keep up); points dropped and counted")

    def _sanitize(self, data: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            converted = to_number(value)
            if converted is None:
                self.drops.add("bad_value")
                self._warn_once(
                    f"value-{type(value).__name__}", f"cannot log a {type(value).__name__} ({key!r}); dropped"
                )
                continue
            out[key] = converted
        return out

    def _command_event(self, result: dict[str, Any]) -> None:
        """Every final command result is also an event in the run's stream (chart markers)."""
        level = "info" if result.get("status") == APPLIED else "warning"
        self._sink.emit_event(EVENT_COMMAND, result.get("step"), dict(result), level)
        step = result.get("step")
        from trimtab.autopilot import autopilot_scalars

        record = autopilot_scalars(result)
        if record and isinstance(step, int):
            self._put_scalars(step, time.time(), record)

    def _log_lrs(self, step: int, lrs: dict[int, float]) -> None:
        """``lr/group<i>``: the LR each param group's update of ``step`` used."""
        if lrs and not self._closed:
            self._put_scalars(step, time.time(), {f"lr/group{i}": lr for i, lr in lrs.items()})

    def _set_id(self, run_id: int) -> None:
        self._id = run_id
        self._id_known.set()

    def _open_spool(self) -> Spool | None:
        root = self.options.spool_path
        if root is None:
            return None
        try:
            spool = Spool(root / self.uid)
            spool.write_meta(self._meta())
            return spool
        except (OSError, SpoolLocked) as exc:
            logger.warning("trimtab: no disk spool (%s); unacked batches are held in memory only", exc)
            return None

    def _meta(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.identity), "server": self.options.server}

    def _checked_text(self, what: str, text: str, limit: int) -> str:
        text = str(text).replace("\x00", "")
        if len(text) <= limit:
            return text
        logger.warning("trimtab: the run %s is longer than %d characters; truncated", what, limit)
        return text[:limit]

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning("trimtab: %s", message)


def _finish_at_exit(ref: weakref.ref[Run]) -> None:
    run = ref()
    if run is not None and not run._closed:
        run.finish()


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker, say) has no sender thread and must not reuse the
    # parent's seq numbers: its copy of every run goes quiet. ``log`` checks the pid too.
    for run in list(_live_runs):
        run._closed = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
