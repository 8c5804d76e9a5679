"""Per-run stream state: seq numbers, the unacked window and resend after reconnect. No I/O.

The transport (``sender.py``) moves bytes; this class decides which seq a batch gets, what
must still be sent, what may be forgotten, and what to resend after a reconnect. The server
acks a seq only after its rows are committed and ignores a seq it already has, so keeping
every unacked batch and resending it gives exactly-once storage.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from trimtab.spool import Location


@dataclass
class Pending:
    """One unacked batch: its bytes while held in memory, its place in the disk spool if any."""

    data: bytes | None
    location: Location | None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else 0


class Session:
    """Seq assignment and the unacked window for one run."""

    def __init__(self, next_seq: int = 1, window: int = 32) -> None:
        if next_seq < 1:
            raise ValueError("seq numbers start at 1")
        self.next_seq = next_seq
        self.window = window
        self.unacked: OrderedDict[int, Pending] = OrderedDict()
        self._to_send: deque[int] = deque()
        self._in_flight: set[int] = set()
        self.memory_bytes = 0

    # -- new data
    def assign(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def add(self, seq: int, data: bytes | None, location: Location | None) -> None:
        """Hold a batch until it is acked; it is queued for sending."""
        if data is None and location is None:
            raise ValueError("a pending batch needs its bytes or a spool location")
        self.unacked[seq] = Pending(data, location)
        self.memory_bytes += len(data) if data is not None else 0
        self._to_send.append(seq)

    def release_memory(self, budget: int) -> list[int]:
        """Forget the bytes of the oldest spooled batches until memory fits ``budget``.

        Returns the seqs whose bytes were released (they are re-read from the spool to resend).
        """
        released = []
        for seq, pending in self.unacked.items():
            if self.memory_bytes <= budget:
                break
            if pending.data is not None and pending.location is not None:
                self.memory_bytes -= len(pending.data)
                pending.data = None
                released.append(seq)
        return released

    def drop_oldest(self) -> int | None:
        """Forget the oldest batch that only memory holds (no spool has it). Returns its seq,
        or None when every batch in memory is also in the spool."""
        seq = next((s for s, p in self.unacked.items() if p.location is None and p.data is not None), None)
        if seq is not None:
            self._forget(seq)
        return seq

    # -- connection lifecycle
    @property
    def resume_from_seq(self) -> int:
        """Lowest seq the agent still holds; ``next_seq`` if it holds nothing."""
        return next(iter(self.unacked), self.next_seq)

    def on_welcome(self, acked_seq: int) -> list[tuple[int, Pending]]:
        """The server has every seq from ``resume_from_seq`` up to ``acked_seq``: forget those
        (returned, so their spool records can go), and queue every other unacked batch for
        resending, in seq order."""
        forgotten = [(seq, self._forget(seq)) for seq in [s for s in self.unacked if s <= acked_seq]]
        self._to_send = deque(self.unacked)
        self._in_flight.clear()
        return forgotten

    def on_disconnect(self) -> None:
        self._in_flight.clear()
        self._to_send = deque(self.unacked)

    def next_to_send(self) -> int | None:
        """The next seq to send now, or None when nothing is queued or the window is full."""
        if len(self._in_flight) >= self.window:
            return None
        while self._to_send:
            seq = self._to_send.popleft()
            if seq in self.unacked:
                self._in_flight.add(seq)
                return seq
        return None

    def on_ack(self, seq: int) -> Pending | None:
        """Forget an acked batch; None for a seq it did not hold (a late duplicate ack)."""
        if seq not in self.unacked:
            return None
        return self._forget(seq)

    def on_reject(self, seq: int) -> Pending | None:
        """The server refused this batch for good: forget it (the caller counts the drop)."""
        return self.on_ack(seq)

    @property
    def all_spooled(self) -> bool:
        """True when every unacked batch is in the disk spool (nothing lives in memory only)."""
        return all(p.location is not None for p in self.unacked.values())

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def idle(self) -> bool:
        """True when nothing is waiting for an ack."""
        return not self.unacked

    def _forget(self, seq: int) -> Pending:
        pending = self.unacked.pop(seq)
        self.memory_bytes -= pending.size
        self._in_flight.discard(seq)
        return pending
