"""Spools left by processes that died before the server acknowledged everything: a new run on
the same machine replays them, one sender each, to the server they were meant for."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from trimtab.buffer import Drops
from trimtab.options import Options
from trimtab.sender import Identity, Sender
from trimtab.session import Session
from trimtab.spool import Spool, SpoolLocked, orphaned_runs

logger = logging.getLogger("trimtab")


def replay_orphans(options: Options, exclude_uid: str, started: Callable[[Sender], None]) -> None:
    """Replay, each on a sender of its own, the spools that dead processes left for this
    server (every spool under ``options.spool_path`` but ``exclude_uid``'s)."""
    root = options.spool_path
    assert root is not None
    try:
        orphans = list(orphaned_runs(root, exclude=exclude_uid))
    except OSError as exc:
        logger.warning("trimtab: cannot scan the spool %s for earlier runs: %s", root, exc)
        return
    for path in orphans:
        try:
            _start_replay(options, path, started)
        except Exception as exc:  # one damaged spool must not stop the others
            logger.warning("trimtab: cannot replay the spool %s: %s", path, exc)


def _start_replay(options: Options, path: Path, started: Callable[[Sender], None]) -> None:
    meta = Spool.read_meta(path)
    if meta is None or meta.get("server") != options.server:
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
    session = Session(next_seq=records[-1][0] + 1, window=options.window)
    for seq, location in records:
        session.add(seq, None, location)
    logger.info("trimtab: replaying %d spooled batches of run %s", len(records), identity.uid)
    replay = Sender(options, identity, session, spool, Drops())
    finished_at = meta.get("finished_at")
    if isinstance(finished_at, (int, float)) and not isinstance(finished_at, bool):
        replay.replay_finished_at = float(finished_at)  # the process reached finish(): end the run then
    started(replay)
    replay.start()
