"""The sender: a daemon thread that owns one run's websocket, spool and session.

It drains the log buffer into batches, writes each batch ahead to the disk spool, sends
within a window of unacked batches, reads acks, reconnects with jittered exponential
backoff and resends what the server has not acked. Everything here runs off the training
thread; every exception is caught, logged and counted (``trimtab.internal``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from trimtab import internal, protocol
from trimtab.buffer import Buffer, Chunk, Drops
from trimtab.control import Controller
from trimtab.handshake import Handshake
from trimtab.options import Options
from trimtab.session import Pending, Session
from trimtab.spool import Spool

logger = logging.getLogger("trimtab")

POLL_SECONDS = 0.02
BACKOFF_INITIAL = 0.25
# How long finish() keeps trying while the server is unreachable and nothing would be lost
# by giving up (everything is in the spool, or everything is acked and only bye is left).
OFFLINE_FINISH_GRACE = 5.0
# How long to wait for the server to confirm bye (it closes once the run is marked finished).
BYE_WAIT = 5.0


@dataclass(frozen=True)
class Identity:
    uid: str
    project: str
    name: str | None
    agent_version: str
    config: dict[str, Any]
    rank: int = 0
    world_size: int = 1
    started_at: float | None = None  # the wall time of trimtab.init


class Backoff:
    """Exponential backoff with "equal jitter": a delay drawn from the upper half of the
    doubling ceiling, so reconnecting agents spread out but never retry at once."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum, self.attempts = initial, maximum, 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * (2**self.attempts))
        self.attempts += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0


class Sender:
    """Streams one run. ``buffer`` is None for a replay of an orphaned spool."""

    def __init__(
        self,
        opts: Options,
        identity: Identity,
        session: Session,
        spool: Spool | None,
        drops: Drops,
        buffer: Buffer | None = None,
        on_run_id: Callable[[int], None] | None = None,
        control: Controller | None = None,
    ) -> None:
        self.opts = opts
        self.identity = identity
        self.session = session
        self.spool = spool
        self.drops = drops
        self.buffer = buffer
        self._on_run_id = on_run_id
        self.control = control  # None for a replay of an orphaned spool: it applies no commands
        self._ws: ClientConnection | None = None
        self._handshake: Handshake | None = None
        self._stop = threading.Event()
        self._deadline = float("inf")
        self._offline_deadline = float("inf")
        self._backoff = Backoff(BACKOFF_INITIAL, opts.max_backoff)
        self._next_attempt = 0.0
        self._final_try = False
        # An orphan replay of a process that reached finish(): when it did (the spool's meta)
        self.replay_finished_at: float | None = None
        self._final_try_until = 0.0
        self._last_flush = 0.0
        self._last_heartbeat = 0.0
        self._warned: set[str] = set()
        self.finished_cleanly = False
        self.connected = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"trimtab-sender-{identity.uid[:8]}", daemon=True)

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._thread.start()

    def request_stop(self, deadline: float, offline_deadline: float) -> None:
        """Flush and stop by ``deadline`` (monotonic); give up at ``offline_deadline`` if the
        server is unreachable and giving up loses nothing (see OFFLINE_FINISH_GRACE)."""
        self._deadline = deadline
        self._offline_deadline = offline_deadline
        self._final_try = True  # one more connection attempt now, whatever the backoff says
        self._stop.set()

    def join(self, timeout: float) -> bool:
        """Wait for the thread; True when every batch was acked and the server confirmed bye
        (for a replay: when every batch was acked)."""
        self._thread.join(max(0.0, timeout))
        return self.finished_cleanly

    # ------------------------------------------------------------------ thread
    def _main(self) -> None:
        while True:
            try:
                if self._iterate():
                    break
            except Exception as exc:
                internal.report("sender loop", exc)
                self._disconnect()
                time.sleep(0.5)
        self._close()

    def _iterate(self) -> bool:
        """One turn of the loop; True when the sender is done."""
        stopping = self._stop.is_set()
        now = time.monotonic()
        if stopping or now - self._last_flush >= self.opts.flush_interval:
            self._collect()
            self._last_flush = now
        if self.buffer is None and self.session.idle:
            # An orphan replay ends once the server has it all; the run of a process that
            # reached finish() then ends as finished, when it did.
            if self.replay_finished_at is not None and self._ws is not None:
                self._deadline = time.monotonic() + BYE_WAIT
                self._say_bye(self.replay_finished_at)
            self.finished_cleanly = True
            return True
        if stopping:
            if now >= self._deadline:
                return True
            if self._ws is None and self._final_try:
                # The backoff may have put the next attempt past the offline grace: a server
                # that came back meanwhile still gets the run's end (and its bye). One attempt
                # now (or the one in flight), given the grace to finish.
                self._final_try = False
                if self._handshake is None:
                    self._next_attempt = now
                self._final_try_until = now + OFFLINE_FINISH_GRACE
            nothing_to_lose = self._drained() or (self.spool is not None and self.session.all_spooled)
            trying = self._handshake is not None and now < self._final_try_until
            if self._ws is None and now >= self._offline_deadline and nothing_to_lose and not trying:
                return True
            if self._ws is not None and self._drained():
                self._say_bye()
                return True
        if self._ws is None:
            self._advance_handshake(now)
            time.sleep(POLL_SECONDS)  # keep draining into the spool while the handshake runs
            return False
        self._send_ready()
        self._send_results()
        self._pump(POLL_SECONDS)
        if now - self._last_heartbeat >= self.opts.heartbeat_interval:
            self._send_frame(protocol.heartbeat_frame(self.drops.snapshot()))
            self._last_heartbeat = now
        return False

    def _send_results(self) -> None:
        """Command results from the training thread (and ``delivered`` answers). One lost
        with a dropped connection is not lost for good: the server redelivers a command that
        has no final result, and the controller answers a known id with its stored result."""
        if self.control is None:
            return
        for result in self.control.take_outgoing():
            self._send_frame(
                protocol.cmd_result_frame(result["id"], result["status"], result["step"], result["detail"])
            )

    def _drained(self) -> bool:
        return self.session.idle and (self.buffer is None or len(self.buffer) == 0)

    # ------------------------------------------------------------------ batches
    def _collect(self) -> None:
        if self.buffer is None:
            return
        for chunk in self.buffer.drain(self.opts.max_batch_points):
            try:
                self._add_batches(chunk)
            except Exception as exc:  # one batch that cannot be built must not take the rest
                internal.report("building a batch", exc)
                self.drops.add("internal_error", chunk.n_points + len(chunk.histograms) + len(chunk.events))
        self._bound_memory()

    def _add_batches(self, chunk: Chunk) -> None:
        """Give ``chunk`` a seq and hold it; split it first if its frame would exceed the limit."""
        seq = self.session.next_seq
        data = protocol.encode(protocol.batch_frame(seq, chunk.scalars, chunk.histograms, chunk.events))
        if len(data) > protocol.MAX_FRAME_BYTES:
            halves = _split(chunk)
            if not halves:  # one histogram or event that alone exceeds a frame
                self.drops.add("too_large")
                self._warn_once("too_large", "a histogram or event is larger than a frame (8 MiB); dropped")
            for half in halves:
                self._add_batches(half)
            return
        self.session.assign()
        location = None
        if self.spool is not None:
            try:
                location = self.spool.append(seq, data)
            except OSError as exc:
                self._warn_once("spool", f"cannot write the spool ({exc}); holding batches in memory only")
        self.session.add(seq, data, location)

    def _bound_memory(self) -> None:
        budget = self.opts.max_memory_bytes
        if self.session.memory_bytes <= budget:
            return
        self.session.release_memory(budget)
        while self.session.memory_bytes > budget:
            seq = self.session.drop_oldest()
            if seq is None:
                return
            self.drops.add("memory_bound")
            self._warn_once(
                "memory", f"unacked batches exceed {budget} bytes with no spool; dropping the oldest (seq {seq})"
            )

    def _send_ready(self) -> None:
        while self._ws is not None:
            seq = self.session.next_to_send()
            if seq is None:
                return
            pending = self.session.unacked[seq]
            data = pending.data
            if data is None:
                assert pending.location is not None and self.spool is not None
                data = self.spool.read(pending.location)
            self._send_bytes(data)

    # ------------------------------------------------------------------ connection
    def _advance_handshake(self, now: float) -> None:
        """Start a connection attempt when one is due, and take its result when it is done."""
        attempt = self._handshake
        if attempt is None:
            if now >= self._next_attempt:
                self._handshake = Handshake(self.opts, self._hello())
            return
        if not attempt.done:
            return
        self._handshake = None
        if attempt.ws is None or attempt.welcome is None:
            why, fatal = attempt.failure()
            self._schedule_retry(why, fatal=fatal)
            return
        self._on_connected(attempt.ws, attempt.welcome)

    def _hello(self) -> bytes:
        return protocol.encode(
            protocol.hello_frame(
                uid=self.identity.uid,
                project=self.identity.project,
                name=self.identity.name,
                resume_from_seq=self.session.resume_from_seq,
                agent_version=self.identity.agent_version,
                host=socket.gethostname(),
                pid=os.getpid(),
                rank=self.identity.rank,
                world_size=self.identity.world_size,
                config=self.identity.config,
                replay=self.buffer is None,
                started_at=self.identity.started_at,
            )
        )

    def _on_connected(self, ws: ClientConnection, welcome: protocol.Welcome) -> None:
        self._ws = ws
        self._backoff.reset()
        self._warned.discard("connect")
        for seq, pending in self.session.on_welcome(welcome.acked_seq):
            self._spool_acked(seq, pending)
        if self._on_run_id is not None:
            self._on_run_id(welcome.run_id)
        if self.control is not None:
            self.control.on_reconnect()
        self.connected.set()
        logger.info("trimtab: streaming run %s to %s", welcome.run_id, self.opts.server)

    def _say_bye(self, finished_at: float | None = None) -> None:
        """Send bye and wait for the server to close the connection, which it does once the
        run is marked finished. Only then is the finish clean."""
        self._send_frame(protocol.bye_frame(self.drops.snapshot(), finished_at))
        wait_until = min(self._deadline, time.monotonic() + BYE_WAIT)
        while self._ws is not None and time.monotonic() < wait_until:
            try:
                self._ws.recv(timeout=max(0.0, wait_until - time.monotonic()))
            except TimeoutError:
                break
            except ConnectionClosed as closed:
                self.finished_cleanly = closed.rcvd is not None and closed.rcvd.code == 1000
                break
            except OSError:
                break

    def _schedule_retry(self, why: str, fatal: bool = False) -> None:
        delay = self.opts.max_backoff if fatal else self._backoff.next_delay()
        self._next_attempt = time.monotonic() + delay
        self._warn_once("connect", f"{why}; spooling and retrying (next try in {delay:.1f}s)")

    def _disconnect(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
        self._ws = None
        self.connected.clear()
        self.session.on_disconnect()
        self._next_attempt = time.monotonic() + self._backoff.next_delay()

    def _send_bytes(self, data: bytes) -> None:
        assert self._ws is not None
        try:
            self._ws.send(data)
        except (OSError, ConnectionClosed) as exc:
            logger.info("trimtab: connection lost while sending (%s); will resend", exc)
            self._disconnect()

    def _send_frame(self, frame: dict[str, Any]) -> None:
        if self._ws is not None:
            self._send_bytes(protocol.encode(frame))

    def _pump(self, timeout: float) -> None:
        """Read frames from the server for up to ``timeout`` seconds (less once one arrives)."""
        while self._ws is not None:
            try:
                raw = self._ws.recv(timeout=timeout)
            except TimeoutError:
                return
            except (OSError, ConnectionClosed) as exc:
                logger.info("trimtab: connection closed (%s); will reconnect and resend", exc)
                self._disconnect()
                return
            if isinstance(raw, str):
                raw = raw.encode()
            try:
                frame = protocol.decode_server_frame(raw)
            except protocol.ProtocolError as exc:  # a newer server's frame, or a broken one: go on
                self._warn_once(f"frame-{exc.code.value}", f"ignoring a frame from the server: {exc.message}")
            else:
                self._handle(frame)
            timeout = 0.0  # drain what is already here, then go back to batching

    def _handle(self, frame: protocol.ServerFrame) -> None:
        if isinstance(frame, protocol.Ack):
            pending = self.session.on_ack(frame.seq)
            if pending is not None:
                self._spool_acked(frame.seq, pending)
        elif isinstance(frame, protocol.ServerError):
            if frame.seq is not None:
                pending = self.session.on_reject(frame.seq)
                if pending is not None:
                    self._spool_acked(frame.seq, pending)
                    self.drops.add("rejected_batches")
                logger.error("trimtab: server rejected batch %s: %s (%s)", frame.seq, frame.message, frame.code)
            else:
                logger.warning("trimtab: server error %s: %s", frame.code, frame.message)
        elif isinstance(frame, protocol.Command):
            if self.control is None:  # an orphan replay: the live run's sender takes commands
                return
            self.control.receive(frame)  # queued for the training thread; "delivered" goes out now
            self._send_results()
        else:  # a welcome after the handshake
            self._warn_once("frame-welcome", "ignoring a second welcome from the server")

    def _spool_acked(self, seq: int, pending: Pending) -> None:
        if self.spool is not None and pending.location is not None:
            self.spool.acked(seq, pending.location)

    def _close(self) -> None:
        if self._handshake is not None:
            self._handshake.abandon()
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None
        if self.spool is not None:
            self.spool.close(remove_if_empty=self.session.idle)
        if not self.finished_cleanly and not self.session.idle:
            where = f" (kept in {self.spool.directory} for replay)" if self.spool is not None else ""
            logger.warning("trimtab: %d batches not acknowledged at finish%s", len(self.session.unacked), where)

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning("trimtab: %s", message)


def _split(chunk: Chunk) -> list[Chunk]:
    """Two halves of a chunk: scalars apart from entries, then by key, then by points; [] when
    it is a single histogram or event."""
    if chunk.scalars and (chunk.histograms or chunk.events):
        return [Chunk(scalars=chunk.scalars), Chunk(histograms=chunk.histograms, events=chunk.events)]
    if chunk.histograms or chunk.events:
        entries = [("histograms", e) for e in chunk.histograms] + [("events", e) for e in chunk.events]
        if len(entries) == 1:
            return []
        halves = [Chunk(), Chunk()]
        for i, (name, entry) in enumerate(entries):
            getattr(halves[i * 2 // len(entries)], name).append(entry)
        return halves
    series = chunk.scalars
    if len(series) > 1:
        mid = len(series) // 2
        return [Chunk(scalars=series[:mid]), Chunk(scalars=series[mid:])]
    (one,) = series
    cut = len(one["steps"]) // 16 * 8  # half the points, on an 8-byte boundary
    columns = ("steps", "walls", "values")
    first = dict(one, **{c: one[c][:cut] for c in columns})
    second = dict(one, **{c: one[c][cut:] for c in columns})
    return [Chunk(scalars=[first]), Chunk(scalars=[second])]
