"""A slot's past: its saved detector state, restored when a slot is new to this process, and
the stored points it has not seen, read back in step order to be fed to it."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from sqlalchemy import Connection

from trimtab.detectors import RuleEvaluator, RuleSpec
from trimtab.server.alerts import store as db
from trimtab.server.alerts.slots import Slot, in_step_order

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
        (key, db.points_after(conn, run_id, slot.rank, key, slot.seen[key], page, newest=newest))
        for key in slot.evaluator.keys
    ]
    yield from in_step_order(slot, series)
