"""Session logic without sockets: seq numbers, the window, acks, resend after reconnect."""

from __future__ import annotations

import pytest

from trimtab.session import Session
from trimtab.spool import Location


def _fill(session: Session, n: int) -> list[int]:
    seqs = []
    for _ in range(n):
        seq = session.assign()
        session.add(seq, b"x" * 10, Location(1, seq * 100, 10))
        seqs.append(seq)
    return seqs


def _send_all(session: Session) -> list[int]:
    out = []
    while (seq := session.next_to_send()) is not None:
        out.append(seq)
    return out


def test_seqs_are_strictly_increasing_from_one() -> None:
    session = Session()
    assert [session.assign() for _ in range(3)] == [1, 2, 3]
    with pytest.raises(ValueError):
        Session(next_seq=0)


def test_window_limits_batches_in_flight() -> None:
    session = Session(window=3)
    _fill(session, 5)
    assert _send_all(session) == [1, 2, 3]
    session.on_ack(1)
    assert _send_all(session) == [4]
    assert session.in_flight == 3


def test_ack_forgets_and_duplicate_ack_is_harmless() -> None:
    session = Session()
    _fill(session, 2)
    _send_all(session)
    assert session.on_ack(1) is not None
    assert session.on_ack(1) is None
    assert list(session.unacked) == [2]


def test_reconnect_resends_every_unacked_batch_in_order() -> None:
    session = Session(window=10)
    _fill(session, 5)
    _send_all(session)
    session.on_ack(2)
    session.on_disconnect()
    assert session.resume_from_seq == 1
    forgotten = session.on_welcome(acked_seq=1)  # the server also had seq 1
    assert [seq for seq, _ in forgotten] == [1]
    assert _send_all(session) == [3, 4, 5]


def test_welcome_with_nothing_stored_resends_everything() -> None:
    session = Session()
    _fill(session, 3)
    _send_all(session)
    session.on_welcome(acked_seq=0)
    assert _send_all(session) == [1, 2, 3]


def test_resume_from_seq_is_next_seq_when_idle() -> None:
    session = Session()
    _fill(session, 2)
    session.on_ack(1)
    session.on_ack(2)
    assert session.idle and session.resume_from_seq == 3


def test_reject_forgets_the_batch() -> None:
    session = Session()
    _fill(session, 2)
    _send_all(session)
    assert session.on_reject(1) is not None
    assert list(session.unacked) == [2]


def test_memory_release_keeps_spooled_batches_resendable() -> None:
    session = Session()
    _fill(session, 4)
    assert session.memory_bytes == 40
    released = session.release_memory(budget=15)
    assert released == [1, 2, 3]
    assert session.memory_bytes == 10
    assert all(session.unacked[s].data is None and session.unacked[s].location for s in released)
    assert _send_all(session) == [1, 2, 3, 4]


def test_memory_release_never_forgets_an_unspooled_batch() -> None:
    session = Session()
    seq = session.assign()
    session.add(seq, b"y" * 50, None)
    assert session.release_memory(budget=0) == []
    assert session.unacked[seq].data == b"y" * 50
    assert session.drop_oldest() == seq and session.memory_bytes == 0


def test_all_spooled_is_false_while_a_batch_lives_only_in_memory() -> None:
    session = Session()
    _fill(session, 2)
    assert session.all_spooled
    seq = session.assign()
    session.add(seq, b"memory only", None)
    assert not session.all_spooled
