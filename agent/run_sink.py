"""What the watcher writes through (``Run``'s side of ``watch.Sink``): records go straight to
the run's buffer, histograms to a bounded queue, events to one that never drops."""

from __future__ import annotations

import time
from array import array
from typing import TYPE_CHECKING, Any

from trimtab.jsonsafe import to_json
from trimtab.protocol import event_entry, histogram_entry

if TYPE_CHECKING:
    from trimtab.run import Run


class RunSink:
    """What the watcher writes through: records go straight to the buffer, histograms to a
    bounded queue, events to one that never drops."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self.rank = run.identity.rank

    def emit_scalars(self, step: int, wall: float, record: dict[str, float]) -> None:
        if record and not self._run._closed:
            self._run._put_scalars(step, wall, record)

    def emit_histogram(self, key: str, step: int, wall: float, counts: list[int], lo: float, width: float) -> None:
        from trimtab.histogram import to_host  # imports torch: only once there are histograms

        run = self._run
        if run._closed:
            return
        bins = len(counts) - 3
        h = to_host(counts, lo, width, bins)
        entry = histogram_entry(key, step, wall, array("d", h.edges), array("q", h.counts), h.nan, h.pinf, h.ninf)
        if not run._buffer.put_histogram(entry):
            run.drops.add("histogram_queue_full")
            run._warn_once("hqueue", "histogram queue is full (the sender cannot keep up); histograms dropped")

    def emit_event(self, kind: str, step: int | None, data: dict[str, Any], level: str = "info") -> None:
        if not self._run._closed:
            self._run._buffer.put_event(event_entry(kind, step, time.time(), to_json(data), level))

    def warn_once(self, topic: str, message: str) -> None:
        self._run._warn_once(topic, message)
