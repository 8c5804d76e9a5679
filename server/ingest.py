"""The ingest writer: one thread that turns batches into rows, group-committing many batches
per transaction, and resolves each batch's future only after its rows are committed.

Dedupe is by (run, rank, seq) against ``ingested_seqs``, written in the same transaction as
the rows, so a resent batch is acknowledged again but stored once. Scalar rows go in with
the fastest path each driver has: ``executemany`` on SQLite, binary ``COPY`` on PostgreSQL.
The scalar rollups (``rollups.py``) are folded in by the same transaction, so a view built
from them always agrees with the points.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from sqlalchemy import Connection, case, insert, select, update

from trimtab.errors import ErrorCode, TrimtabError
from trimtab.protocol import Batch, ProtocolError, pack_f64, pack_i64
from trimtab.server.db import rollups
from trimtab.server.db.errors import is_data_error
from trimtab.server.db.store import Store
from trimtab.server.db.tables import events, histograms, ingested_seqs, metric_keys, runs

logger = logging.getLogger("trimtab.server")

# A group commit closes at this many points (bounded latency and memory per transaction).
GROUP_MAX_POINTS = 250_000
# Metric key ids remembered by the writer (least recently used go first).
KEY_CACHE_SIZE = 100_000

STORED = "stored"
DUPLICATE = "duplicate"


@dataclass
class Job:
    run_id: int
    rank: int
    batch: Batch
    future: Future[str] = field(default_factory=Future)


class IngestWriter:
    def __init__(self, store: Store, on_commit: Callable[[list[tuple[int, int, Batch]]], None] | None = None) -> None:
        self.store = store
        # Called on the writer thread after each commit with the (run id, rank, batch) newly
        # stored, before they are acked; must not block (the alert engine queues them).
        self.on_commit = on_commit
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._keys: OrderedDict[tuple[int, int, str, str], int] = OrderedDict()  # (run, rank, kind, name), LRU
        self._thread = threading.Thread(target=self._main, name="trimtab-ingest", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, run_id: int, rank: int, batch: Batch) -> Future[str]:
        job = Job(run_id, rank, batch)
        self._queue.put(job)
        return job.future

    # ------------------------------------------------------------------ thread
    def _main(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            group, points = [first], first.batch.n_points
            while points < GROUP_MAX_POINTS:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                group.append(job)
                points += job.batch.n_points
            self._write_group(group)

    def _write_group(self, group: list[Job]) -> None:
        try:
            results = self._commit(group)
        except Exception as exc:
            self._keys.clear()  # ids inserted by the rolled-back transaction do not exist
            if not is_data_error(exc):  # unreachable, locked, full, timed out: resend later
                if not isinstance(exc, TrimtabError):
                    logger.error("ingest: the database failed (%s: %s); agents will resend", type(exc).__name__, exc)
                error = (
                    exc
                    if isinstance(exc, TrimtabError)
                    else TrimtabError(
                        ErrorCode.STORE_UNAVAILABLE, f"the database is unavailable ({type(exc).__name__}); resend later"
                    )
                )
                for job in group:
                    job.future.set_exception(error)
                return
            if len(group) > 1:
                # One batch the database refuses must not fail its neighbours: isolate it.
                for job in group:
                    self._write_group([job])
                return
            job = group[0]
            logger.exception("run %s: batch %d cannot be stored; rejecting it", job.run_id, job.batch.seq)
            message = f"the server cannot store batch {job.batch.seq} ({type(exc).__name__}); it is dropped"
            job.future.set_exception(ProtocolError(ErrorCode.INVALID_BATCH, message, seq=job.batch.seq))
            return
        if self.on_commit is not None:
            stored = [(j.run_id, j.rank, j.batch) for j, r in zip(group, results, strict=True) if r == STORED]
            try:
                self.on_commit(stored)
            except Exception:
                logger.exception("ingest: the commit hook failed; the batches are stored and acked regardless")
        for job, result in zip(group, results, strict=True):
            job.future.set_result(result)

    def _commit(self, group: list[Job]) -> list[str]:
        now = time.time()
        results: list[str] = []
        with self.store.transaction() as conn:
            seen: set[tuple[int, int, int]] = set()
            fresh: list[Job] = []
            for job in group:
                ident = (job.run_id, job.rank, job.batch.seq)
                if ident in seen or self._already_ingested(conn, *ident):
                    results.append(DUPLICATE)
                    continue
                seen.add(ident)
                fresh.append(job)
                results.append(STORED)
            if fresh:
                self._insert(conn, fresh, now)
        return results

    @staticmethod
    def _already_ingested(conn: Connection, run_id: int, rank: int, seq: int) -> bool:
        return (
            conn.execute(
                select(ingested_seqs.c.seq).where(
                    ingested_seqs.c.run_id == run_id, ingested_seqs.c.rank == rank, ingested_seqs.c.seq == seq
                )
            ).first()
            is not None
        )

    def _insert(self, conn: Connection, jobs: list[Job], now: float) -> None:
        scalar_parts: list[Iterable[tuple[int, int, float, float]]] = []
        hist_rows: list[dict[str, Any]] = []
        event_rows: list[dict[str, Any]] = []
        per_run: dict[int, dict[str, Any]] = {}
        rollup_rows = rollups.RollupBatch()
        for job in jobs:
            totals = per_run.setdefault(
                job.run_id, {"n_points": 0, "n_histograms": 0, "n_events": 0, "last_step": None}
            )
            batch = job.batch
            for series in batch.scalars:
                if not len(series):
                    continue
                key_id = self._key_id(conn, job.run_id, job.rank, "scalar", series.key)
                scalar_parts.append(zip(repeat(key_id), series.steps, series.walls, series.values))
                rollup_rows.add(key_id, series.steps, series.walls, series.values)
                totals["n_points"] += len(series)
                totals["last_step"] = _max(totals["last_step"], max(series.steps))
            for h in batch.histograms:
                hist_rows.append(
                    {
                        "key_id": self._key_id(conn, job.run_id, job.rank, "histogram", h.key),
                        "step": h.step,
                        "wall_time": h.wall,
                        "edges": pack_f64(h.edges),
                        "counts": pack_i64(h.counts),
                        "nan_count": h.nan,
                        "pinf_count": h.pinf,
                        "ninf_count": h.ninf,
                    }
                )
                totals["n_histograms"] += 1
            for e in batch.events:
                event_rows.append(
                    {
                        "run_id": job.run_id,
                        "rank": job.rank,
                        "step": e.step,
                        "wall_time": e.wall,
                        "kind": e.kind,
                        "level": e.level[:16],
                        "data": e.data,
                    }
                )
                totals["n_events"] += 1
        if scalar_parts:
            self._insert_scalars(conn, _chain(scalar_parts))
            rollups.write(conn, self.store.sqlite, rollup_rows)
        if hist_rows:
            conn.execute(insert(histograms), hist_rows)
        if event_rows:
            conn.execute(insert(events), event_rows)
        conn.execute(
            insert(ingested_seqs),
            [{"run_id": j.run_id, "rank": j.rank, "seq": j.batch.seq, "ingested_at": now} for j in jobs],
        )
        for run_id, t in per_run.items():
            values: dict[str, Any] = {
                "last_seen_at": now,
                "n_points": runs.c.n_points + t["n_points"],
                "n_histograms": runs.c.n_histograms + t["n_histograms"],
                "n_events": runs.c.n_events + t["n_events"],
            }
            if t["last_step"] is not None:
                # portable max(last_step, new): NULL-safe CASE, no dialect greatest()

                values["last_step"] = case(
                    (runs.c.last_step.is_(None), t["last_step"]),
                    (runs.c.last_step < t["last_step"], t["last_step"]),
                    else_=runs.c.last_step,
                )
            conn.execute(update(runs).where(runs.c.id == run_id).values(**values))

    def _insert_scalars(self, conn: Connection, rows: Iterator[tuple[int, int, float, float]]) -> None:
        # The driver's own bulk paths, inside SQLAlchemy's transaction on the same connection.
        raw: Any = conn.connection.dbapi_connection
        if self.store.sqlite:
            cur = raw.cursor()
            try:
                cur.executemany("INSERT INTO scalar_points (key_id, step, wall_time, value) VALUES (?, ?, ?, ?)", rows)
            finally:
                cur.close()
            return
        with (
            raw.cursor() as cur,
            cur.copy("COPY scalar_points (key_id, step, wall_time, value) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["int4", "int8", "float8", "float8"])
            for row in rows:
                copy.write_row(row)

    def _key_id(self, conn: Connection, run_id: int, rank: int, kind: str, name: str) -> int:
        """The id of a rank's key: each rank of a run has its own series of every key."""
        cache_key = (run_id, rank, kind, name)
        key_id = self._keys.get(cache_key)
        if key_id is not None:
            self._keys.move_to_end(cache_key)
            return key_id
        ident = {"run_id": run_id, "kind": kind, "name": name, "rank": rank}
        key_id, _ = self.store.get_or_create(conn, metric_keys, ident, {}, conflict=["run_id", "kind", "name", "rank"])
        self._keys[cache_key] = key_id
        if len(self._keys) > KEY_CACHE_SIZE:
            self._keys.popitem(last=False)
        return key_id


def _chain(parts: list[Iterable[tuple[int, int, float, float]]]) -> Iterator[tuple[int, int, float, float]]:
    for part in parts:
        yield from part


def _max(a: int | None, b: int) -> int:
    return b if a is None else max(a, b)
