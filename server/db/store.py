"""The store: every SQL statement outside the ingest hot path lives here.

Methods are blocking; the API and websocket handlers call them through a thread pool.
Database errors leave as ``TrimtabError(STORE_UNAVAILABLE)`` so clients get a 503 with a
message, never a stack trace.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Table, and_, case, func, select, union_all, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from trimtab.errors import ErrorCode, TrimtabError
from trimtab.jsonsafe import from_json
from trimtab.protocol import Hello, unpack_array
from trimtab.server.db.engine import is_sqlite
from trimtab.server.db.scalar_view import ScalarView, read_view
from trimtab.server.db.tables import events, histograms, ingested_seqs, metric_keys, projects, runs, scalar_points

logger = logging.getLogger("trimtab.server")

# Called as (conn, run_id, project_id) inside the transaction that creates a run.
RunCreated = Callable[[Connection, int, int], object]

RUN_COLUMNS = (
    runs.c.id,
    runs.c.uid,
    projects.c.name.label("project"),
    runs.c.name,
    runs.c.status,
    runs.c.created_at,
    runs.c.last_seen_at,
    runs.c.finished_at,
    runs.c.host,
    runs.c.agent_version,
    runs.c.world_size,
    runs.c.n_points,
    runs.c.n_histograms,
    runs.c.n_events,
    runs.c.last_step,
    runs.c.drops,
    runs.c.config,
)


@dataclass(frozen=True)
class ScalarRows:
    steps: list[int]
    walls: list[float]
    values: list[float]


@dataclass(frozen=True)
class HistogramRow:
    step: int
    wall_time: float
    edges: list[float]
    counts: list[int]
    nan: int
    pinf: int
    ninf: int


@dataclass(frozen=True)
class HistogramPage:
    rows: list[HistogramRow]  # ordered by step
    truncated: bool  # older rows in the requested range were left out


# Drop counters of ranks other than 0 are stored in the run's ``drops`` as "rank<N>/<reason>".
_OTHER_RANK_DROP = re.compile(r"rank\d+/")


def merge_drops(current: dict[str, int], rank: int, drops: dict[str, int]) -> dict[str, int]:
    """The run's drops with ``rank``'s own counts replaced by ``drops``: rank 0's under the bare
    reason names (as for a single-process run), rank N's under "rank<N>/<reason>"."""
    if rank == 0:
        kept = {k: v for k, v in current.items() if _OTHER_RANK_DROP.match(k)}
        return {**kept, **drops}
    prefix = f"rank{rank}/"
    kept = {k: v for k, v in current.items() if not k.startswith(prefix)}
    return {**kept, **{prefix + k: v for k, v in drops.items()}}


class Store:
    def __init__(self, engine: Engine, stale_after_s: float = 60.0) -> None:
        self.engine = engine
        self.sqlite = is_sqlite(str(engine.url))
        self.stale_after_s = stale_after_s

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, InterfaceError, PoolTimeout) as exc:  # unreachable, locked, full, pool busy
            logger.error("database error: %s", exc)
            raise TrimtabError(
                ErrorCode.STORE_UNAVAILABLE,
                f"the database is unavailable: {type(getattr(exc, 'orig', None) or exc).__name__}",
            ) from exc

    # ------------------------------------------------------------------ runs lifecycle
    def open_run(self, hello: Hello, on_created: RunCreated | None = None) -> tuple[int, int]:
        """Find or create the run named by ``hello``. Returns (run id, acked seq).
        ``on_created(conn, run_id, project_id)`` runs in the transaction that creates a run.

        Every rank of a multi-process run says hello with the same uid: the run's world size
        becomes the largest any rank reported. Rank 0 owns the run's state: only its hello
        (not a replay) marks the run running again and sets its host.
        """
        now = time.time()
        # A run first seen through a replay started when its trimtab.init ran, not now (never
        # later than now: a clock ahead of the server's does not put a run in the future).
        started = now if hello.started_at is None else min(now, hello.started_at)
        with self.transaction() as conn:
            project_id, _ = self.get_or_create(
                conn, projects, {"name": hello.run.project}, {"created_at": now}, conflict=["name"]
            )
            new_run = {
                "project_id": project_id,
                "name": hello.run.name,
                "status": "running",
                "created_at": started,
                "last_seen_at": now,
                "host": hello.host[:256],
                "agent_version": hello.agent_version[:64],
                "world_size": hello.world_size,
                "config": hello.config,
                "drops": {},
            }
            run_id, created = self.get_or_create(conn, runs, {"uid": hello.run.uid}, new_run, conflict=["uid"])
            if created and on_created is not None:
                on_created(conn, run_id, project_id)
            if not created:  # an existing run: an agent reconnecting, or another rank of it
                owner = conn.execute(select(runs.c.project_id).where(runs.c.id == run_id)).scalar_one()
                if owner != project_id:
                    raise TrimtabError(ErrorCode.RUN_CONFLICT, f"run {hello.run.uid} belongs to another project")
                values: dict[str, Any] = {
                    "last_seen_at": now,
                    "world_size": case(
                        (runs.c.world_size < hello.world_size, hello.world_size), else_=runs.c.world_size
                    ),
                }
                if hello.rank == 0 and not hello.replay:
                    values.update(status="running", finished_at=None, host=hello.host[:256])
                conn.execute(update(runs).where(runs.c.id == run_id).values(**values))
            return run_id, self._acked_seq(conn, run_id, hello.rank, hello.resume_from_seq)

    def get_or_create(
        self, conn: Connection, table: Table, ident: dict[str, Any], extra: dict[str, Any], conflict: list[str]
    ) -> tuple[int, bool]:
        """(id, created) of the row matching ``ident``, inserting it (with ``extra``) if missing.

        INSERT ... ON CONFLICT DO NOTHING, then SELECT: safe against a concurrent insert of the
        same row by another connection or server replica, with no savepoint.
        """
        where = [table.c[k] == v for k, v in ident.items()]
        found = conn.execute(select(table.c.id).where(*where)).scalar()
        if found is not None:
            return int(found), False
        insert_ = sqlite_insert if self.sqlite else pg_insert
        # RETURNING, not rowcount: psycopg reports -1 rows for an INSERT through SQLAlchemy
        inserted = conn.execute(
            insert_(table)
            .values(**ident, **extra)
            .on_conflict_do_nothing(index_elements=conflict)
            .returning(table.c.id)
        ).scalar()
        if inserted is not None:
            return int(inserted), True
        return int(conn.execute(select(table.c.id).where(*where)).scalar_one()), False

    @staticmethod
    def _acked_seq(conn: Connection, run_id: int, rank: int, resume_from: int) -> int:
        """Highest seq such that every seq from ``resume_from`` to it is stored."""
        acked = max(resume_from, 1) - 1
        seqs = conn.execute(
            select(ingested_seqs.c.seq)
            .where(ingested_seqs.c.run_id == run_id, ingested_seqs.c.rank == rank, ingested_seqs.c.seq > acked)
            .order_by(ingested_seqs.c.seq)
        ).scalars()
        for seq in seqs:
            if seq != acked + 1:
                break
            acked = seq
        return acked

    def touch_run(self, run_id: int, rank: int = 0, drops: dict[str, int] | None = None) -> None:
        """A heartbeat: the run was seen; non-empty ``drops`` replace this rank's drop counts."""
        with self.transaction() as conn:
            conn.execute(update(runs).where(runs.c.id == run_id).values(last_seen_at=time.time()))
            if drops:
                self._set_drops(conn, run_id, rank, drops)

    def finish_run(
        self, run_id: int, rank: int = 0, drops: dict[str, int] | None = None, finished_at: float | None = None
    ) -> None:
        """A bye. Rank 0's finishes the run; another rank's only reports its final drops, since
        the other ranks of the job may still be running. ``finished_at``: a replay's bye says
        when the run really ended (never later than now)."""
        now = time.time()
        values: dict[str, Any] = {"last_seen_at": now}
        if rank == 0:
            values.update(status="finished", finished_at=now if finished_at is None else min(now, finished_at))
        with self.transaction() as conn:
            conn.execute(update(runs).where(runs.c.id == run_id).values(**values))
            if drops is not None:
                self._set_drops(conn, run_id, rank, drops)

    @staticmethod
    def _set_drops(conn: Connection, run_id: int, rank: int, drops: dict[str, int]) -> None:
        # Read-modify-write, safe against another rank doing the same: the UPDATE before this in
        # the transaction holds the run row's lock (PostgreSQL) or the write lock (SQLite).
        current = conn.execute(select(runs.c.drops).where(runs.c.id == run_id)).scalar() or {}
        conn.execute(update(runs).where(runs.c.id == run_id).values(drops=merge_drops(current, rank, drops)))

    # ------------------------------------------------------------------ queries
    def list_runs(self, project: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        query = select(*RUN_COLUMNS).join(projects, projects.c.id == runs.c.project_id)
        if project is not None:
            query = query.where(projects.c.name == project)
        query = query.order_by(runs.c.id.desc()).limit(limit).offset(offset)
        with self.transaction() as conn:
            return [self._run_dict(r._mapping) for r in conn.execute(query)]

    def get_run(self, run_id: int) -> dict[str, Any]:
        query = select(*RUN_COLUMNS).join(projects, projects.c.id == runs.c.project_id).where(runs.c.id == run_id)
        with self.transaction() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise TrimtabError(ErrorCode.RUN_NOT_FOUND, f"no run with id {run_id}")
        return self._run_dict(row._mapping)

    def _run_dict(self, row: Any) -> dict[str, Any]:
        out = dict(row)
        out["config"] = from_json(out["config"] or {})  # "Infinity" in a config reads back as a float
        if out["status"] == "running" and time.time() - out["last_seen_at"] > self.stale_after_s:
            out["status"] = "stale"  # heartbeats stopped; the run may still come back
        return out

    @staticmethod
    def _require_run(conn: Connection, run_id: int) -> None:
        if conn.execute(select(runs.c.id).where(runs.c.id == run_id)).first() is None:
            raise TrimtabError(ErrorCode.RUN_NOT_FOUND, f"no run with id {run_id}")

    def list_keys(self, run_id: int, rank: int | None = None) -> list[dict[str, Any]]:
        """Every key of the run (of one rank, if given) with its number of rows and last step."""
        run_keys = select(metric_keys.c.id).where(metric_keys.c.run_id == run_id)
        if rank is not None:
            run_keys = run_keys.where(metric_keys.c.rank == rank)

        def stats(table: Table, kind: str) -> Any:
            return (
                select(table.c.key_id, func.count().label("n"), func.max(table.c.step).label("last_step"))
                .where(table.c.key_id.in_(run_keys.where(metric_keys.c.kind == kind)))
                .group_by(table.c.key_id)
            )

        per_key = union_all(stats(scalar_points, "scalar"), stats(histograms, "histogram")).subquery()
        query = (
            select(metric_keys.c.name, metric_keys.c.kind, metric_keys.c.rank, per_key.c.n, per_key.c.last_step)
            .select_from(metric_keys.outerjoin(per_key, per_key.c.key_id == metric_keys.c.id))
            .where(metric_keys.c.id.in_(run_keys))
            .order_by(metric_keys.c.kind, metric_keys.c.name, metric_keys.c.rank)
        )
        with self.transaction() as conn:
            self._require_run(conn, run_id)
            return [
                {"key": r.name, "kind": r.kind, "rank": r.rank, "count": int(r.n or 0), "last_step": r.last_step}
                for r in conn.execute(query)
            ]

    @staticmethod
    def _key_id(conn: Connection, run_id: int, kind: str, name: str, rank: int) -> int:
        """The run must exist and have this key on this rank."""
        Store._require_run(conn, run_id)
        key_id = conn.execute(
            select(metric_keys.c.id).where(
                metric_keys.c.run_id == run_id,
                metric_keys.c.kind == kind,
                metric_keys.c.name == name,
                metric_keys.c.rank == rank,
            )
        ).scalar()
        if key_id is None:
            raise TrimtabError(ErrorCode.KEY_NOT_FOUND, f"run {run_id} has no {kind} key {name!r} on rank {rank}")
        return int(key_id)

    def scalar_rows(
        self, run_id: int, key: str, since_step: int | None, end_step: int | None, rank: int = 0
    ) -> ScalarRows:
        with self.transaction() as conn:
            key_id = self._key_id(conn, run_id, "scalar", key, rank)
            cond = [scalar_points.c.key_id == key_id, *_step_range(scalar_points, since_step, end_step)]
            result = conn.execute(
                select(scalar_points.c.step, scalar_points.c.wall_time, scalar_points.c.value)
                .where(and_(*cond))
                .order_by(scalar_points.c.step, scalar_points.c.wall_time)
            ).all()
        nan = float("nan")
        if not result:
            return ScalarRows([], [], [])
        steps, walls, values = (list(col) for col in zip(*result, strict=False))
        # NULL is how SQLite stores NaN; read it back as NaN on every backend.
        return ScalarRows(steps, walls, [nan if v is None else v for v in values])

    def scalar_view(
        self, run_id: int, key: str, lo: int | None, hi: int | None, max_points: int, rank: int = 0
    ) -> ScalarView:
        """Steps ``lo``..``hi`` (inclusive, None: unbounded) of the key as at most ``max_points``
        points: raw when they fit, else each bucket's extremes and non-finite markers."""
        with self.transaction() as conn:
            return read_view(conn, self._key_id(conn, run_id, "scalar", key, rank), lo, hi, max_points)

    def histogram_rows(
        self, run_id: int, key: str, rank: int, since_step: int | None, end_step: int | None, limit: int
    ) -> HistogramPage:
        """The newest ``limit`` histograms of the key in the step range, oldest first."""
        h = histograms.c
        with self.transaction() as conn:
            key_id = self._key_id(conn, run_id, "histogram", key, rank)
            cond = [h.key_id == key_id, *_step_range(histograms, since_step, end_step)]
            result = conn.execute(
                select(h.step, h.wall_time, h.edges, h.counts, h.nan_count, h.pinf_count, h.ninf_count)
                .where(and_(*cond))
                .order_by(h.step.desc(), h.wall_time.desc())
                .limit(limit + 1)  # one more tells whether older rows were left out
            ).all()
        rows = [
            HistogramRow(
                step=r.step,
                wall_time=r.wall_time,
                edges=unpack_array("d", bytes(r.edges)).tolist(),
                counts=unpack_array("q", bytes(r.counts)).tolist(),
                nan=r.nan_count,
                pinf=r.pinf_count,
                ninf=r.ninf_count,
            )
            for r in reversed(result[:limit])
        ]
        return HistogramPage(rows, truncated=len(result) > limit)

    def event_rows(
        self,
        run_id: int,
        *,
        kind: str | None = None,
        level: str | None = None,
        rank: int | None = None,
        since_step: int | None = None,
        after_id: int | None = None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """The run's first ``limit`` events after ``after_id`` that match the filters, by id."""
        e = events.c
        cond = [e.run_id == run_id]
        if kind is not None:
            cond.append(e.kind == kind)
        if level is not None:
            cond.append(e.level == level)
        if rank is not None:
            cond.append(e.rank == rank)
        if since_step is not None:
            cond.append(e.step > since_step)  # events without a step never match
        if after_id is not None:
            cond.append(e.id > after_id)
        query = (
            select(e.id, e.rank, e.step, e.wall_time, e.kind, e.level, e.data)
            .where(and_(*cond))
            .order_by(e.id)
            .limit(limit)
        )
        with self.transaction() as conn:
            self._require_run(conn, run_id)
            return [dict(r._mapping) for r in conn.execute(query)]


def _step_range(table: Table, since_step: int | None, end_step: int | None) -> list[Any]:
    """Steps strictly after ``since_step`` and up to and including ``end_step``."""
    cond = []
    if since_step is not None:
        cond.append(table.c.step > since_step)
    if end_step is not None:
        cond.append(table.c.step <= end_step)
    return cond
