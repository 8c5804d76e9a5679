"""The disk spool: append, read back, recover after a crash (torn tail included), clean up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trimtab import spool as spool_mod
from trimtab.spool import Spool, SpoolLocked, orphaned_runs


def test_append_read_and_recover_in_order(tmp_path: Path) -> None:
    s = Spool(tmp_path / "run")
    locs = {seq: s.append(seq, f"batch-{seq}".encode()) for seq in range(1, 6)}
    assert s.read(locs[3]) == b"batch-3"
    s.close(remove_if_empty=False)
    again = Spool(tmp_path / "run")
    recovered = list(again.recover())
    assert [seq for seq, _ in recovered] == [1, 2, 3, 4, 5]
    assert [again.read(loc) for _, loc in recovered] == [f"batch-{i}".encode() for i in range(1, 6)]


def test_torn_tail_ends_recovery_without_error(tmp_path: Path) -> None:
    s = Spool(tmp_path / "run")
    s.append(1, b"complete")
    s.append(2, b"also complete")
    s.close(remove_if_empty=False)
    segment = next((tmp_path / "run").glob("seg-*.log"))
    data = segment.read_bytes()
    segment.write_bytes(data[:-4])  # the process died mid-write of record 2
    assert [seq for seq, _ in Spool(tmp_path / "run").recover()] == [1]


def test_corrupted_record_fails_its_crc(tmp_path: Path) -> None:
    s = Spool(tmp_path / "run")
    s.append(1, b"aaaa")
    s.append(2, b"bbbb")
    s.close(remove_if_empty=False)
    segment = next((tmp_path / "run").glob("seg-*.log"))
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert [seq for seq, _ in Spool(tmp_path / "run").recover()] == [1]


def test_acked_segments_are_deleted_and_empty_spool_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "SEGMENT_BYTES", 64)
    s = Spool(tmp_path / "run")
    locs = [(seq, s.append(seq, b"z" * 40)) for seq in range(1, 7)]
    assert len(list((tmp_path / "run").glob("seg-*.log"))) >= 3
    for seq, loc in locs[:-1]:
        s.acked(seq, loc)
    assert len(list((tmp_path / "run").glob("seg-*.log"))) == 1
    s.acked(*locs[-1])
    s.close()
    assert not (tmp_path / "run").exists()


def test_unacked_spool_survives_close(tmp_path: Path) -> None:
    s = Spool(tmp_path / "run")
    s.append(1, b"keep me")
    s.close()
    assert (tmp_path / "run").exists()


def test_second_owner_is_refused_and_live_spools_are_not_orphans(tmp_path: Path) -> None:
    s = Spool(tmp_path / "live")
    s.write_meta({"uid": "live"})
    code = (
        "import sys; from pathlib import Path; from trimtab.spool import Spool, SpoolLocked\n"
        f"try:\n    Spool(Path({str(tmp_path / 'live')!r}))\nexcept SpoolLocked:\n    sys.exit(3)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 3
    assert list(orphaned_runs(tmp_path)) == []
    s.close(remove_if_empty=False)
    assert [p.name for p in orphaned_runs(tmp_path)] == ["live"]
    assert list(orphaned_runs(tmp_path, exclude="live")) == []


def test_meta_round_trip(tmp_path: Path) -> None:
    s = Spool(tmp_path / "run")
    s.write_meta({"uid": "abc", "server": "http://x"})
    assert Spool.read_meta(tmp_path / "run") == {"uid": "abc", "server": "http://x"}
    assert Spool.read_meta(tmp_path / "missing") is None
    # flock locks belong to the open file description, so a second open in-process conflicts too
    with pytest.raises(SpoolLocked):
        Spool(tmp_path / "run")
    s.close()
