"""The buffer's three queues and how the sender splits what they hold into frames."""

from __future__ import annotations

from array import array

from trimtab.buffer import Buffer, Chunk, Drops
from trimtab.protocol import event_entry, histogram_entry
from trimtab.sender import _split


def hist(key: str, step: int, bins: int = 4) -> dict[str, object]:
    return histogram_entry(key, step, 1.0, array("d", range(bins + 1)), array("q", [1] * bins))


def test_histograms_are_bounded_and_events_never_dropped() -> None:
    drops = Drops()
    buf = Buffer(max_records=10, drops=drops, max_histograms=3)
    assert [buf.put_histogram(hist("h", s)) for s in range(5)] == [True, True, True, False, False]
    for s in range(1000):
        buf.put_event(event_entry("nonfinite", s, 1.0, {"step": s}))
    assert buf.put((0, 1.0, {"loss": 1.0}))
    assert len(buf) == 1 + 3 + 1000
    chunks = buf.drain(max_points=100, max_entries=256)
    assert sum(len(c.events) for c in chunks) == 1000
    assert [h["step"] for c in chunks for h in c.histograms] == [0, 1, 2]
    assert chunks[0].scalars and chunks[0].histograms, "entries ride along with the scalars when there is room"
    assert all(len(c.events) <= 256 for c in chunks)
    assert len(buf) == 0


def test_an_entry_with_a_bad_key_is_dropped_and_counted() -> None:
    drops = Drops()
    buf = Buffer(max_records=10, drops=drops)
    buf.put_histogram(hist("bad\x00key", 0))
    buf.put_histogram(hist("good", 0))
    (chunk,) = buf.drain(max_points=100)
    assert [h["k"] for h in chunk.histograms] == ["good"]
    assert drops.snapshot() == {"bad_key": 1}


def test_split_separates_scalars_from_entries_then_halves_entries() -> None:
    chunk = Chunk(scalars=[{"k": "x", "steps": b"\0" * 16}], histograms=[hist("a", 0)], events=[{"kind": "e"}])
    first, second = _split(chunk)
    assert first.scalars and not first.histograms and not first.events
    assert second.histograms and second.events and not second.scalars
    halves = _split(Chunk(histograms=[hist("a", s) for s in range(5)], events=[{"kind": "e"}] * 3))
    assert [len(h.histograms) + len(h.events) for h in halves] == [4, 4]
    assert _split(Chunk(histograms=[hist("a", 0)])) == []
