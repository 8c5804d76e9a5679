"""The alert engine: runs the effective rules on the ingest stream, on a thread of its own.

The ingest writer hands over the scalars and nonfinite events of each committed batch
(``submit``); the engine feeds every point of a matched key to the ``RuleEvaluator`` of its
(run, rank, rule, key) "slot" and turns findings into alert rows: a finding opens an alert
or folds into the firing one (warning -> critical is an escalation); a point of the key
without a finding ``resolve_after_steps`` steps past the alert's last finding, the run
finishing, or the rule going away resolve it. Every notification is an outbox row
(``outbox.enqueue``) written in the same transaction as the alert change.

History and restarts: a slot new to this process restores its saved state (evaluator state
and the last step it saw of each key, saved to ``detector_states`` every ``state_interval_s``
while it changes, and at a clean stop) and is then fed every stored point after those steps;
without a saved state that fits the rule, it starts fresh and is fed the key's stored history
(the last ``REPLAY_MAX_POINTS``). When its run was already evaluated here (so the slot is new
because its rule is), the points before the batch that made it are history, and what they
open is not notified. So a rule's findings do not depend on when it was created or when the
server restarted: nothing is missed. A finding at or before the last step of the slot's
newest alert was already handled and is ignored, so nothing is alerted twice. Points of a key
arriving at or before the last step seen of it are not fed (each series in step order).

Replicas: the database is the truth. A fold or escalation applies only to an alert still
firing; when another replica resolved it, or opened one meanwhile, the slot takes the alert
the database has. A saved detector state is not replaced by one that has seen fewer steps.

Ended runs: a periodic sweep resolves the firing alerts of runs that finished (in case the
end-of-run resolution was missed or failed) and of runs not seen for ``stale_resolve_s``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, select

from trimtab.detectors import RuleSpec
from trimtab.protocol import EVENT_NONFINITE, Batch, Event, ScalarSeries
from trimtab.server.alerts import store as db
from trimtab.server.alerts.replay import restore_slot, stored_points
from trimtab.server.alerts.rules import effective
from trimtab.server.alerts.slots import EngineStats, Op, RunState, Slot, feed_point, in_step_order
from trimtab.server.alerts.writer import AlertWriter
from trimtab.server.db.store import Store
from trimtab.server.db.tables import runs

logger = logging.getLogger("trimtab.server")

# Points (and nonfinite events) waiting for the engine past which a batch is not queued
# itself: its (run, rank) is marked for a catch-up that replays the stored points instead
# (bounded memory).
QUEUE_MAX_POINTS = 1_000_000
STATE_INTERVAL_S = 2.0  # dirty detector states are saved this often
RULES_TTL_S = 5.0  # a run's rules are read again this often (changes made on other replicas)
IDLE_EVICT_S = 600.0  # a run without batches this long leaves memory (its state is saved)
# A fresh slot replays at most this many stored points per key (the newest): a rule new to a
# long run starts from its recent history, not from step 0. A slot that has seen the key
# replays everything after what it saw.
REPLAY_MAX_POINTS = 200_000
REPLAY_PAGE_POINTS = 20_000  # stored points are read this many rows at a time
SWEEP_INTERVAL_S = 60.0  # the firing alerts of ended runs are looked for this often
STALE_RESOLVE_S = 3600.0  # a run not seen (no data, no heartbeat) this long: its alerts resolve


@dataclass(frozen=True)
class _Feed:
    run_id: int
    rank: int
    scalars: list[ScalarSeries]  # non-empty series only
    nonfinite: list[Event]  # the batch's nonfinite events (NaN provenance)

    @property
    def size(self) -> int:
        """What it counts toward ``queue_max_points``."""
        return sum(len(s) for s in self.scalars) + len(self.nonfinite)


@dataclass(frozen=True)
class _CatchUp:
    run_id: int
    rank: int


@dataclass(frozen=True)
class _RunFinished:
    run_id: int


@dataclass(frozen=True)
class _RulesChanged:
    project_id: int


@dataclass(frozen=True)
class _Barrier:
    done: threading.Event


_Item = _Feed | _CatchUp | _RunFinished | _RulesChanged | _Barrier | None


class AlertEngine:
    def __init__(
        self,
        store: Store,
        base_url: str,
        *,
        state_interval_s: float = STATE_INTERVAL_S,
        rules_ttl_s: float = RULES_TTL_S,
        queue_max_points: int = QUEUE_MAX_POINTS,
        replay_max_points: int = REPLAY_MAX_POINTS,
        replay_page_points: int = REPLAY_PAGE_POINTS,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
        stale_resolve_s: float = STALE_RESOLVE_S,
    ) -> None:
        self.store = store
        self.base_url = base_url
        self.state_interval_s = state_interval_s
        self.rules_ttl_s = rules_ttl_s
        self.queue_max_points = queue_max_points
        self.replay_max_points = replay_max_points
        self.replay_page_points = replay_page_points
        self.sweep_interval_s = sweep_interval_s
        self.stale_resolve_s = stale_resolve_s
        self.on_notify: Callable[[], None] | None = None  # called after a commit that queued notifications
        self.stats = EngineStats()
        self.writer = AlertWriter(store, base_url, self.stats)
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued_points = 0
        # (run, rank) with a catch-up queued -> the first step of the batches it stands for
        self._catch_up_from: dict[tuple[int, int], int | None] = {}
        self._unfinished: set[int] = set()  # runs whose end-of-run resolution failed: retried
        self._runs: dict[int, RunState] = {}
        self._thread = threading.Thread(target=self._main, name="trimtab-alerts", daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Process what is queued (for up to ``timeout``), save every state, stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def queued_points(self) -> int:
        """Points and events handed over and not processed yet."""
        with self._lock:
            return self._queued_points

    def submit(self, jobs: Iterable[tuple[int, int, Batch]]) -> None:
        """Committed batches, from the ingest writer; never blocks. Only what the engine
        reads is kept (the scalars and the nonfinite events, never histograms)."""
        for run_id, rank, batch in jobs:
            feed = _Feed(
                run_id,
                rank,
                [s for s in batch.scalars if len(s)],
                [e for e in batch.events if e.kind == EVENT_NONFINITE and e.step is not None],
            )
            if not feed.scalars and not feed.nonfinite:
                continue
            n = feed.size
            first = min((s.steps[0] for s in feed.scalars), default=None)
            with self._lock:
                if self._queued_points + n > self.queue_max_points:
                    if (run_id, rank) in self._catch_up_from:
                        marked = self._catch_up_from[(run_id, rank)]
                        if first is not None and (marked is None or first < marked):
                            self._catch_up_from[(run_id, rank)] = first
                        continue
                    self._catch_up_from[(run_id, rank)] = first
                    self.stats.catch_ups += 1
                    item: _Item = _CatchUp(run_id, rank)
                else:
                    self._queued_points += n
                    item = feed
            self._queue.put(item)

    def run_finished(self, run_id: int) -> None:
        self._queue.put(_RunFinished(run_id))

    def rules_changed(self, project_id: int) -> None:
        self._queue.put(_RulesChanged(project_id))

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued before this call is processed."""
        done = threading.Event()
        self._queue.put(_Barrier(done))
        return done.wait(timeout)

    # ------------------------------------------------------------------ engine thread
    def _main(self) -> None:
        next_save = time.monotonic() + self.state_interval_s
        next_sweep = time.monotonic() + self.sweep_interval_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, min(next_save, next_sweep) - time.monotonic()))
            except queue.Empty:
                item = _Barrier(threading.Event())  # nothing to do but the periodic work
            if item is None:
                self._save_states(everything=True)
                return
            self._handle(item)
            if time.monotonic() >= next_save:
                self._save_states()
                self._evict_idle()
                for run_id in sorted(self._unfinished):
                    self._handle(_RunFinished(run_id))
                next_save = time.monotonic() + self.state_interval_s
            if time.monotonic() >= next_sweep:
                self._sweep_ended_runs()
                next_sweep = time.monotonic() + self.sweep_interval_s

    def _handle(self, item: _Item) -> None:
        run_id = getattr(item, "run_id", None)
        try:
            if isinstance(item, _Feed):
                with self._lock:
                    self._queued_points -= item.size
                self._feed(item)
            elif isinstance(item, _CatchUp):
                with self._lock:
                    first = self._catch_up_from.pop((item.run_id, item.rank), None)
                self._catch_up(item.run_id, item.rank, first)
            elif isinstance(item, _RunFinished):
                self._unfinished.add(item.run_id)  # until its alerts are resolved
                self._finish_run(item.run_id)
                self._unfinished.discard(item.run_id)
            elif isinstance(item, _RulesChanged):
                self._rules_changed(item.project_id)
            elif isinstance(item, _Barrier):
                item.done.set()
        except Exception:
            self.stats.failures += 1
            logger.exception("alert engine: %s failed; the run's detectors reload and replay", type(item).__name__)
            if run_id is not None:
                self._runs.pop(run_id, None)  # memory may be ahead of the database: rebuild from it

    # ------------------------------------------------------------------ runs and rules
    def _run_state(self, conn: Connection, run_id: int) -> RunState | None:
        rs = self._runs.get(run_id)
        if rs is None:
            project_id = conn.execute(select(runs.c.project_id).where(runs.c.id == run_id)).scalar()
            if project_id is None:
                return None  # deleted meanwhile
            rs = self._runs[run_id] = RunState(run_id, int(project_id))
        rs.last_active = time.monotonic()
        return rs

    def _reload_rules(self, conn: Connection, rs: RunState, ops: list[Op] | None = None) -> list[Op]:
        """Read the run's rules again and bring its slots in line; returns resolve ops for
        alerts whose rule is gone, disabled, or no longer matches their key."""
        ops = [] if ops is None else ops
        rs.rules = [r.spec for r in effective(conn, rs.project_id, rs.run_id) if r.spec.enabled]
        rs.rules_at = time.monotonic()
        ops.extend(rs.reconcile())
        return ops

    def _slot(
        self, conn: Connection, rs: RunState, rank: int, spec: RuleSpec, key: str, ops: list[Op], live_from: int | None
    ) -> Slot:
        """The slot, from memory, else restored from its saved state, else fresh; either way
        then fed the stored points it has not seen. A fresh slot is fed the key's recent
        history; what it finds before ``live_from`` (the first step of the data that made it,
        given when the run was already being evaluated here, so the slot is new because its
        rule is) was history before the rule: the alerts it opens are not notified."""
        slot = rs.slots.get((rank, spec.name, key))
        if slot is not None:
            return slot
        slot, fresh = restore_slot(conn, rs.run_id, rank, spec, key)
        rs.add(slot)
        self._replay(conn, rs, slot, ops, fresh=fresh, silent_before=live_from if fresh else None)
        return slot

    def _replay(
        self,
        conn: Connection,
        rs: RunState,
        slot: Slot,
        ops: list[Op],
        fresh: bool = False,
        silent_before: int | None = None,
    ) -> None:
        """Feed the slot the stored points it has not seen (only the newest
        ``replay_max_points`` per key for a fresh slot)."""
        newest = self.replay_max_points if fresh else None
        for step, key, value in stored_points(conn, rs.run_id, slot, self.replay_page_points, newest):
            silent = silent_before is not None and step < silent_before
            feed_point(slot, key, step, value, ops, self.stats, silent=silent)

    # ------------------------------------------------------------------ feeding
    def _feed(self, item: _Feed) -> None:
        run_id, rank, scalars = item.run_id, item.rank, item.scalars
        known = self._runs.get(run_id)
        if (  # the common case for most keys: no rule matches, so no database round trip
            known is not None
            and time.monotonic() - known.rules_at <= self.rules_ttl_s
            and not item.nonfinite
            and not any(known.specs_for(s.key) for s in scalars)
        ):
            known.last_active = time.monotonic()
            return
        ops: list[Op] = []
        # History is silent only for a run already evaluated here: after a restart, what a
        # fresh slot is fed may be batches committed but never evaluated.
        live_from = None if known is None else min((s.steps[0] for s in scalars), default=None)
        with self.store.transaction() as conn:
            rs = self._run_state(conn, run_id)
            if rs is None:
                return
            self._reload_if_stale(conn, rs, ops)
            for s in scalars:
                for spec in rs.specs_for(s.key):
                    self._slot(conn, rs, rank, spec, s.key, ops, live_from)
        # Each slot gets the batch's points of all its keys at once, merged in step order: a
        # rule confirmed by a second key sees the same sequence whatever the batch size.
        by_slot: dict[int, tuple[Slot, list[ScalarSeries]]] = {}
        for s in scalars:
            for slot in rs.routes.get((rank, s.key)) or ():
                by_slot.setdefault(id(slot), (slot, []))[1].append(s)
        for slot, series in by_slot.values():
            self._series(slot, series, ops)
        provenance = [(rank, e.step, e.data) for e in item.nonfinite if e.step is not None]
        self._woke(self.writer.write(rs, ops, provenance=provenance))

    def _reload_if_stale(self, conn: Connection, rs: RunState, ops: list[Op]) -> None:
        if time.monotonic() - rs.rules_at > self.rules_ttl_s:
            self._reload_rules(conn, rs, ops)

    def _series(self, slot: Slot, series: list[ScalarSeries], ops: list[Op]) -> None:
        """Feed the slot the points of its keys in ``series`` it has not seen (a series all
        replayed from the database already is passed over), in step order across keys."""
        unseen = [s for s in series if not _all_seen(slot, s)]
        points = in_step_order(slot, [(s.key, zip(s.steps, s.values, strict=True)) for s in unseen])
        for step, key, value in points:
            feed_point(slot, key, step, value, ops, self.stats)

    def _catch_up(self, run_id: int, rank: int, first: int | None) -> None:
        """Replay what the queue had no room for: the stored points after each slot's last seen
        step, for every slot of the (run, rank), including keys new to the engine (``first``:
        the first step of the batches not queued)."""
        ops: list[Op] = []
        live_from = first if run_id in self._runs else None
        with self.store.transaction() as conn:
            rs = self._run_state(conn, run_id)
            if rs is None:
                return
            self._reload_if_stale(conn, rs, ops)
            for key in db.scalar_keys(conn, run_id, rank):
                for spec in rs.specs_for(key):
                    self._slot(conn, rs, rank, spec, key, ops, live_from)
            for slot in list(rs.slots.values()):
                if slot.rank == rank:
                    self._replay(conn, rs, slot, ops)
        self._woke(self.writer.write(rs, ops))

    def _woke(self, notified: int) -> None:
        if notified and self.on_notify is not None:
            try:
                self.on_notify()
            except Exception:
                logger.exception("alert engine: waking the delivery worker failed")

    def _finish_run(self, run_id: int) -> None:
        """The run finished (rank 0's bye): every firing alert of it resolves."""
        notified = 0
        with self.store.transaction() as conn:
            now = time.time()
            for alert_id, was_notified in db.firing_of_run(conn, run_id):
                if db.resolve(conn, alert_id, db.RUN_FINISHED, now) and was_notified:
                    notified += self.writer.notify(conn, alert_id, "resolved")
        rs = self._runs.get(run_id)
        if rs is not None:
            for slot in rs.slots.values():
                slot.open = None
        self._woke(notified)

    def _sweep_ended_runs(self) -> None:
        """Resolve the firing alerts of runs that finished (``run_finished``: the bye's own
        resolution was missed, or failed on another replica) or have not been seen for
        ``stale_resolve_s`` (``run_stale``: the process died without a bye)."""
        notified = 0
        resolved: set[int] = set()
        try:
            with self.store.transaction() as conn:
                now = time.time()
                for alert_id, _, was_notified, reason in db.firing_of_ended_runs(
                    conn, now, self.sweep_interval_s, self.stale_resolve_s
                ):
                    if db.resolve(conn, alert_id, reason, now):
                        resolved.add(alert_id)
                        if was_notified:
                            notified += self.writer.notify(conn, alert_id, "resolved")
        except Exception:
            logger.exception("alert engine: resolving the alerts of ended runs failed; retrying at the next sweep")
            return
        for rs in self._runs.values():
            for slot in rs.slots.values():
                if slot.open is not None and slot.open.id in resolved:
                    slot.open = None
        self._woke(notified)

    def _rules_changed(self, project_id: int) -> None:
        """Rules of the project changed: reconcile the runs in memory now, and resolve the
        firing alerts (of any run) whose rule is no longer in force."""
        notified = 0
        for rs in [rs for rs in self._runs.values() if rs.project_id == project_id]:
            ops: list[Op] = []
            with self.store.transaction() as conn:
                self._reload_rules(conn, rs, ops)
            self._woke(self.writer.write(rs, ops))
        with self.store.transaction() as conn:
            now = time.time()
            in_force: dict[int, set[str]] = {}
            for alert_id, run_id, rule, was_notified in db.firing_of_project(conn, project_id):
                if run_id not in in_force:
                    in_force[run_id] = {r.spec.name for r in effective(conn, project_id, run_id) if r.spec.enabled}
                if rule in in_force[run_id]:
                    continue
                if db.resolve(conn, alert_id, db.RULE_REMOVED, now) and was_notified:
                    notified += self.writer.notify(conn, alert_id, "resolved")
        self._woke(notified)

    # ------------------------------------------------------------------ state
    def _save_states(self, everything: bool = False) -> None:
        """Upsert the dirty (or all) slot states, one transaction per run, so that a run whose
        states cannot be saved does not keep the others' from being saved."""
        for rs in list(self._runs.values()):
            dirty = [slot for slot in rs.slots.values() if slot.dirty or everything]
            if not dirty:
                continue
            try:
                with self.store.transaction() as conn:
                    db.save_states(conn, [slot.state_row(rs.run_id) for slot in dirty], self.store.sqlite)
            except Exception:
                logger.exception(
                    "alert engine: saving the detector states of run %s failed; retrying at the next save", rs.run_id
                )
                self._forget_if_deleted(rs.run_id)
                continue
            for slot in dirty:
                slot.dirty = False

    def _forget_if_deleted(self, run_id: int) -> None:
        """A run deleted meanwhile has nothing left to save: it leaves memory."""
        try:
            with self.store.transaction() as conn:
                exists = conn.execute(select(runs.c.id).where(runs.c.id == run_id)).first() is not None
        except Exception:
            return
        if not exists:
            self._runs.pop(run_id, None)

    def _evict_idle(self) -> None:
        cutoff = time.monotonic() - IDLE_EVICT_S
        for run_id in [r for r, rs in self._runs.items() if rs.last_active < cutoff]:
            rs = self._runs[run_id]
            if not any(slot.dirty for slot in rs.slots.values()):
                del self._runs[run_id]


def _all_seen(slot: Slot, series: ScalarSeries) -> bool:
    seen = slot.seen[series.key]
    return seen is not None and max(series.steps) <= seen
