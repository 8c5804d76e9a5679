"""``Run``: what a training script holds. ``log`` is the hot path; everything else is setup."""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from trimtab import internal
from trimtab.buffer import Buffer, Drops
from trimtab.options import Options, jsonable
from trimtab.protocol import MAX_NAME_LENGTH, MAX_PROJECT_LENGTH
from trimtab.sender import BYE_WAIT, OFFLINE_FINISH_GRACE, Identity, Sender
from trimtab.session import Session
from trimtab.spool import Spool, SpoolLocked, orphaned_runs
from trimtab.version import __version__

logger = logging.getLogger("trimtab")

_live_runs: weakref.WeakSet[Run] = weakref.WeakSet()


class Run:
    """One training run streaming to a trimtab server.

    Create it with :func:`trimtab.init`. ``log`` never blocks and never raises; ``finish``
    flushes (also called at interpreter exit and by ``with``).
    """

    def __init__(self, opts: Options) -> None:
        self.options = opts
        self.uid = uuid.uuid4().hex
        self._pid = os.getpid()
        self._closed = False
        self._next_step = 0
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
            config=jsonable(dict(opts.config)),
            rank=opts.rank,
            world_size=opts.world_size,
        )
        spool = self._open_spool()
        self._sender = Sender(
            opts,
            self.identity,
            Session(window=opts.window),
            spool,
            self.drops,
            buffer=self._buffer,
            on_run_id=self._set_id,
        )
        self._replays: list[Sender] = []
        self._sender.start()
        self._scan: threading.Thread | None = None
        if opts.replay_orphans and opts.spool_path is not None:
            self._scan = threading.Thread(target=self._replay_orphans, name="trimtab-replay", daemon=True)
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
        """Queue scalars for ``step`` (the previous step + 1 when omitted). Never blocks or raises.

        Values may be floats, ints, bools, numpy scalars or 0-d torch tensors. A tensor on an
        accelerator is read by the sender thread, so ``log`` itself never synchronises.
        """
        try:
            if self._closed:  # also set in a forked child, by the register_at_fork hook below
                return
            if step is None:
                step = self._next_step
            elif type(step) is not int:
                if not _is_integral(step):
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
            if not self._buffer.put((step, time.time(), record)):
                self.drops.add("queue_full", len(record))
                self._warn_once("queue", "log queue is full (the sender cannot keep up); points dropped and counted")
        except Exception as exc:
            if not isinstance(data, Mapping):
                self.drops.add("bad_data")
                self._warn_once("data", f"log() takes a mapping of key to number, got {type(data).__name__}; ignored")
                return
            internal.report("Run.log", exc)

    def finish(self, timeout: float | None = None) -> bool:
        """Flush everything and end the run. True when the server acknowledged every batch and
        confirmed the run finished.

        Waits at most ``timeout`` (default ``finish_timeout``); while the server is unreachable
        it gives up after 5 s, since everything is already in the disk spool. Whatever is not
        acknowledged stays there, and the next ``trimtab.init`` on this machine replays it.
        """
        if self._closed or os.getpid() != self._pid:
            return False
        self._closed = True
        timeout = self.options.finish_timeout if timeout is None else timeout
        try:
            now = time.monotonic()
            deadline, offline_deadline = now + timeout, now + min(timeout, OFFLINE_FINISH_GRACE)
            if self._scan is not None:  # let the orphan scan start its replays, so they are finished too
                self._scan.join(max(0.0, deadline - now))
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
    def _sanitize(self, data: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            converted = _to_number(value)
            if converted is None:
                self.drops.add("bad_value")
                self._warn_once(
                    f"value-{type(value).__name__}", f"cannot log a {type(value).__name__} ({key!r}); dropped"
                )
                continue
            out[key] = converted
        return out

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

    def _replay_orphans(self) -> None:
        root = self.options.spool_path
        assert root is not None
        try:
            orphans = list(orphaned_runs(root, exclude=self.uid))
        except OSError as exc:
            logger.warning("trimtab: cannot scan the spool %s for earlier runs: %s", root, exc)
            return
        for path in orphans:
            try:
                self._start_replay(path)
            except Exception as exc:  # one damaged spool must not stop the others
                logger.warning("trimtab: cannot replay the spool %s: %s", path, exc)

    def _start_replay(self, path: Path) -> None:
        meta = Spool.read_meta(path)
        if meta is None or meta.get("server") != self.options.server:
            return
        fields = {f.name for f in dataclasses.fields(Identity)}
        identity = Identity(**{k: v for k, v in meta.items() if k in fields})
        try:
            spool = Spool(path)
        except SpoolLocked:
            return  # another process got there first
        try:
            records = list(spool.recover())
        except Exception:
            spool.close(remove_if_empty=False)
            raise
        if not records:
            spool.close()
            return
        session = Session(next_seq=records[-1][0] + 1, window=self.options.window)
        for seq, location in records:
            session.add(seq, None, location)
        logger.info("trimtab: replaying %d spooled batches of run %s", len(records), identity.uid)
        replay = Sender(self.options, identity, session, spool, Drops())
        self._replays.append(replay)
        replay.start()

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning("trimtab: %s", message)


def _to_number(value: Any) -> Any:
    """A float, or a 1-element accelerator tensor to be read by the sender thread; None if not a number."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    if type(value).__module__.startswith("torch"):
        try:
            if value.is_cpu:
                return float(value)  # no device to wait for; raises unless it has one element
            return value.detach() if value.numel() == 1 else None  # read later, off this thread
        except Exception:
            return None
    try:
        return float(value)  # numpy scalars and anything else with __float__
    except (TypeError, ValueError):
        return None


def _is_integral(step: Any) -> bool:
    try:
        return not isinstance(step, bool) and int(step) == step
    except (TypeError, ValueError, OverflowError):
        return False


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
