"""Append-only disk spool of encoded batches, one directory per run.

Layout of ``<spool_dir>/<run uid>/``:

* ``meta.msgpack``: who the run is (uid, project, name, server) so another process can
  replay it;
* ``seg-<first seq>.log``: records ``<seq:u64><length:u32><crc32:u32><payload>``, little
  endian, appended in seq order; a segment rolls over at ``SEGMENT_BYTES``;
* ``lock``: held with ``flock`` by the process that owns the run, so a replaying process
  never touches a live run's spool.

A torn record at the end of a segment (the process died mid-write) fails its CRC or length
check and ends the replay of that segment. Segments whose every seq was acked are deleted.
Writes are not fsynced: the spool survives the training process dying, not the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

try:  # POSIX only; elsewhere the spool works without cross-process locking
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

SEGMENT_BYTES = 16 * 1024 * 1024
_HEADER = struct.Struct("<QII")
_META = "meta.msgpack"


class SpoolLocked(Exception):
    """Another live process owns this spool directory."""


@dataclass(frozen=True)
class Location:
    segment: int  # first seq of the segment file
    offset: int
    length: int


class Spool:
    """The spool of one run. Not thread-safe: only the sender thread uses it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.directory / "lock", "a+b")  # noqa: SIM115 - held for the spool's life
        if fcntl is not None:
            try:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock_file.close()
                raise SpoolLocked(str(directory)) from None
        self._writer: Any = None
        self._writer_segment = 0
        self._writer_size = 0
        # segment -> seqs in it not yet acked
        self._live: dict[int, set[int]] = {}
        self._readers: dict[int, Any] = {}
        self.closed = False

    # -- metadata
    def write_meta(self, meta: dict[str, Any]) -> None:
        tmp = self.directory / (_META + ".tmp")
        tmp.write_bytes(msgpack.packb(meta, use_bin_type=True))
        os.replace(tmp, self.directory / _META)

    @staticmethod
    def read_meta(directory: Path) -> dict[str, Any] | None:
        try:
            meta = msgpack.unpackb((directory / _META).read_bytes(), raw=False)
        except (OSError, ValueError, msgpack.ExtraData):
            return None
        return meta if isinstance(meta, dict) else None

    # -- writing
    def append(self, seq: int, payload: bytes) -> Location:
        if self._writer is None or self._writer_size >= SEGMENT_BYTES:
            self._roll(seq)
        record = _HEADER.pack(seq, len(payload), zlib.crc32(payload)) + payload
        offset = self._writer_size
        try:
            self._writer.write(record)
            self._writer.flush()  # into the page cache: survives the process, not the machine
        except OSError:
            self._discard_partial_write()
            raise
        self._writer_size += len(record)
        self._live.setdefault(self._writer_segment, set()).add(seq)
        return Location(self._writer_segment, offset + _HEADER.size, len(payload))

    def _discard_partial_write(self) -> None:
        """After a failed write (disk full, say), cut the segment back to its last whole
        record so later offsets stay right and replay does not stop at a torn record."""
        writer, self._writer = self._writer, None  # the next append starts a fresh segment
        with contextlib.suppress(OSError):
            writer.close()
        with contextlib.suppress(OSError):
            os.truncate(self._segment_path(self._writer_segment), self._writer_size)

    def _roll(self, first_seq: int) -> None:
        previous = self._writer_segment or None  # 0 until the first segment (seqs start at 1)
        if self._writer is not None:
            self._writer.close()
        self._writer_segment = first_seq
        if previous is not None and not self._live.get(previous):
            self._delete_segment(previous)
        path = self._segment_path(first_seq)
        self._writer = open(path, "ab")  # noqa: SIM115 - closed on roll or close()
        self._writer_size = self._writer.tell()

    # -- reading
    def read(self, location: Location) -> bytes:
        reader = self._readers.get(location.segment)
        if reader is None:
            reader = open(self._segment_path(location.segment), "rb")  # noqa: SIM115 - cached, closed with the spool
            self._readers[location.segment] = reader
        reader.seek(location.offset)
        return bytes(reader.read(location.length))

    def recover(self) -> Iterator[tuple[int, Location]]:
        """Every intact record left by an earlier process, in seq order (for replay)."""
        for segment in sorted(self._segments()):
            path = self._segment_path(segment)
            with open(path, "rb") as f:
                data = f.read()
            offset = 0
            while offset + _HEADER.size <= len(data):
                seq, length, crc = _HEADER.unpack_from(data, offset)
                start = offset + _HEADER.size
                payload = data[start : start + length]
                if len(payload) != length or zlib.crc32(payload) != crc:
                    break  # torn tail: everything after it was never acknowledged as written
                self._live.setdefault(segment, set()).add(seq)
                yield seq, Location(segment, start, length)
                offset = start + length

    # -- acknowledgement
    def acked(self, seq: int, location: Location) -> None:
        """Forget a seq; delete its segment once nothing in it is unacked (unless it is being written)."""
        live = self._live.get(location.segment)
        if live is None:
            return
        live.discard(seq)
        if not live and location.segment != self._writer_segment:
            self._delete_segment(location.segment)

    def _delete_segment(self, segment: int) -> None:
        self._live.pop(segment, None)
        reader = self._readers.pop(segment, None)
        if reader is not None:
            reader.close()
        with contextlib.suppress(FileNotFoundError):
            self._segment_path(segment).unlink()

    @property
    def empty(self) -> bool:
        return not any(self._live.values())

    # -- lifecycle
    def close(self, remove_if_empty: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        if remove_if_empty and self.empty:
            shutil.rmtree(self.directory, ignore_errors=True)
        self._lock_file.close()  # releases the flock

    def _segments(self) -> list[int]:
        out = []
        for path in self.directory.glob("seg-*.log"):
            with contextlib.suppress(ValueError):
                out.append(int(path.stem[4:]))
        return out

    def _segment_path(self, segment: int) -> Path:
        return self.directory / f"seg-{segment:020d}.log"


def orphaned_runs(spool_dir: Path, exclude: str | None = None) -> Iterator[Path]:
    """Run directories under ``spool_dir`` left behind by processes that are gone."""
    if not spool_dir.is_dir():
        return
    for path in sorted(spool_dir.iterdir()):
        if not path.is_dir() or path.name == exclude or not (path / _META).exists():
            continue
        if fcntl is not None:
            try:
                with open(path / "lock", "a+b") as probe:
                    fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(probe.fileno(), fcntl.LOCK_UN)
            except OSError:
                continue  # a live process holds it
        yield path
