"""The hand-off between ``Run.log`` (training thread) and the sender thread.

``log`` appends one tuple to a deque (atomic under the GIL, no lock, no allocation beyond
the tuple and a dict copy); the sender drains the deque and turns records into columnar
series, validating keys and converting deferred device tensors off the training thread.
Histograms wait in a second, bounded deque; events in a third that is never full, because
events (NaN provenance, commands) are never dropped.
"""

from __future__ import annotations

import threading
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from trimtab.protocol import MAX_KEY_LENGTH, scalar_series

Record = tuple[int, float, dict[str, Any]]
Entry = dict[str, Any]  # a histogram or an event, as the protocol encodes it


@dataclass
class Chunk:
    """What one batch frame carries (before the sender splits an oversized one)."""

    scalars: list[dict[str, Any]] = field(default_factory=list)
    histograms: list[Entry] = field(default_factory=list)
    events: list[Entry] = field(default_factory=list)

    @property
    def n_points(self) -> int:
        return sum(len(s["steps"]) // 8 for s in self.scalars)


class Drops:
    """Points or batches dropped, by reason; reported to the server in heartbeats."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._counts[reason] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())


class Buffer:
    def __init__(self, max_records: int, drops: Drops, max_histograms: int = 20_000) -> None:
        self._records: deque[Record] = deque()
        self._histograms: deque[Entry] = deque()
        self._events: deque[Entry] = deque()
        self._max_records = max_records
        self._max_histograms = max_histograms
        self._drops = drops
        self._valid_keys: set[str] = set()

    def put(self, record: Record) -> bool:
        """Called on the training thread; never blocks. False when full (the caller counts)."""
        if len(self._records) >= self._max_records:
            return False
        self._records.append(record)
        return True

    def put_histogram(self, entry: Entry) -> bool:
        """Training thread; never blocks. False when full (the caller counts)."""
        if len(self._histograms) >= self._max_histograms:
            return False
        self._histograms.append(entry)
        return True

    def put_event(self, entry: Entry) -> None:
        """Training thread; never blocks and never drops."""
        self._events.append(entry)

    def __len__(self) -> int:
        return len(self._records) + len(self._histograms) + len(self._events)

    def drain(self, max_points: int, max_entries: int = 256) -> list[Chunk]:
        """Everything queued so far as chunks: scalars at most ``max_points`` points per chunk,
        then histograms and events at most ``max_entries`` per chunk."""
        chunks = [Chunk(scalars=series) for series in self._drain_scalars(max_points)]
        for queue, name in ((self._histograms, "histograms"), (self._events, "events")):
            while queue:
                entries = [queue.popleft() for _ in range(min(len(queue), max_entries))]
                entries = [e for e in entries if self._entry_ok(e)]
                if not entries:
                    continue
                if chunks and not getattr(chunks[-1], name) and chunks[-1].n_points < max_points:
                    setattr(chunks[-1], name, entries)
                else:
                    chunks.append(Chunk(**{name: entries}))
        return chunks

    def _entry_ok(self, entry: Entry) -> bool:
        key = entry.get("k")
        if key is None or self._key_ok(key):
            return True
        self._drops.add("bad_key")
        return False

    def _drain_scalars(self, max_points: int) -> list[list[dict[str, Any]]]:
        batches: list[list[dict[str, Any]]] = []
        cols: dict[str, tuple[array[int], array[float], array[float]]] = {}
        n = 0
        records = self._records
        while records:
            step, wall, data = records.popleft()
            for key, value in data.items():
                col = cols.get(key)
                if col is None:
                    if not self._key_ok(key):
                        self._drops.add("bad_key")
                        continue
                    col = cols[key] = (array("q"), array("d"), array("d"))
                try:
                    col[2].append(value)
                except Exception:  # a deferred tensor that will not convert, or a stray type
                    self._drops.add("bad_value")
                    continue
                try:
                    col[0].append(step)
                except OverflowError:  # outside int64
                    col[2].pop()
                    self._drops.add("bad_step")
                    continue
                col[1].append(wall)
                n += 1
            if n >= max_points:
                batches.append(_series(cols))
                cols, n = {}, 0
        if n:
            batches.append(_series(cols))
        return batches

    def _key_ok(self, key: object) -> bool:
        if key in self._valid_keys:
            return True
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH or "\x00" in key:
            return False
        try:
            key.encode("utf-8")  # a lone surrogate cannot travel
        except UnicodeEncodeError:
            return False
        if len(self._valid_keys) > 100_000:  # someone logs a fresh key every step; stay bounded
            self._valid_keys.clear()
        self._valid_keys.add(key)
        return True


def _series(cols: dict[str, tuple[array[int], array[float], array[float]]]) -> list[dict[str, Any]]:
    return [scalar_series(k, s, w, v) for k, (s, w, v) in cols.items() if len(s)]


def to_number(value: Any) -> Any:
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


def is_integral(step: Any) -> bool:
    """An int, or a number with an integral value (numpy ints, 3.0); not a bool."""
    try:
        return not isinstance(step, bool) and int(step) == step
    except (TypeError, ValueError, OverflowError):
        return False
