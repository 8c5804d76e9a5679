"""A slot's past: its saved detector state, restored when a slot is new to this process, and
the stored points it has not seen, read back in step order to be fed to it."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Iterator

from sqlalchemy import Connection

from trimtab.detectors import RuleEvaluator, RuleSpec
from trimtab.server.alerts import store as db
from trimtab.server.alerts.slots import Slot

logger = logging.getLogger("trimtab.server")


def restore_slot(conn: Connection, run_id: int, rank: int, spec: RuleSpec, key: str) -> tuple[Slot, bool]:
    """The slot of (run, rank, rule, key) from its saved state, or a fresh one when none fits
    the rule; and whether it is fresh. Either way it knows the slot's firing alert and the
    last step already handled by an alert (its findings up to there are not alerted again)."""
    history = db.slot_history(conn, run_id, rank, spec.name, key)
    saved = db.load_state(conn, run_id, rank, spec.name, key)
    evaluator: RuleEvaluator | None = None
    seen: dict[str, int | None] = {}
    if saved is not None:
        try:
            evaluator = RuleEvaluator.restore(spec, key, saved["evaluator"])
            seen = {str(k): None if v is None else int(v) for k, v in dict(saved["seen"]).items()}
        except (ValueError, KeyError, TypeError) as exc:
            logger.info("alert engine: run %s %s on %r starts afresh (%s)", run_id, spec.name, key, exc)
            evaluator = None
    fresh = evaluator is None
    if evaluator is None:
        evaluator = RuleEvaluator(spec, key)
        seen = {}
    slot = Slot(
        rank=rank,
        spec=spec,
        key=key,
        evaluator=evaluator,
        seen={k: seen.get(k) for k in evaluator.keys},
        open=history.open,
        handled=history.handled_step,
        dirty=True,
    )
    return slot, fresh


def stored_points(
    conn: Connection, run_id: int, slot: Slot, page: int, newest: int | None
) -> Iterator[tuple[int, str, float]]:
    """(step, key, value) of every stored point of the slot's keys after the last step it saw
    of each, merged in step order, read forward in pages of ``page`` rows (only the newest
    ``newest`` per key when given)."""
    series = [
        _tagged(i, key, db.points_after(conn, run_id, slot.rank, key, slot.seen[key], page, newest=newest))
        for i, key in enumerate(slot.evaluator.keys)
    ]
    for step, _, key, value in heapq.merge(*series):
        yield step, key, value


def _tagged(i: int, key: str, points: Iterable[tuple[int, float]]) -> Iterator[tuple[int, int, str, float]]:
    """Stored points as (step, key index, key, value), for merging several keys in step order."""
    for step, value in points:
        yield step, i, key, value
