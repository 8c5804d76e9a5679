"""The store: every SQL statement outside the ingest hot path lives here.

Methods are blocking; the API and websocket handlers call them through a thread pool.
Database errors leave as ``TrimtabError(STORE_UNAVAILABLE)`` so clients get a 503 with a
message, never a stack trace.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Table, and_, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from trimtab.errors import ErrorCode, TrimtabError
from trimtab.protocol import Hello
from trimtab.server.engine import is_sqlite
from trimtab.server.tables import ingested_seqs, metric_keys, projects, runs, scalar_points

logger = logging.getLogger("trimtab.server")

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

    def ping(self) -> None:
        with self.transaction() as conn:
            conn.execute(select(1))

    # ------------------------------------------------------------------ runs lifecycle
    def open_run(self, hello: Hello) -> tuple[int, int]:
        """Find or create the run named by ``hello``. Returns (run id, acked seq)."""
        now = time.time()
        with self.transaction() as conn:
            project_id, _ = self.get_or_create(
                conn, projects, {"name": hello.run.project}, {"created_at": now}, conflict=["name"]
            )
            new_run = {
                "project_id": project_id,
                "name": hello.run.name,
                "status": "running",
                "created_at": now,
                "last_seen_at": now,
                "host": hello.host[:256],
                "agent_version": hello.agent_version[:64],
                "world_size": hello.world_size,
                "config": hello.config,
                "drops": {},
            }
            run_id, created = self.get_or_create(conn, runs, {"uid": hello.run.uid}, new_run, conflict=["uid"])
            if not created:  # an existing run reconnecting
                owner = conn.execute(select(runs.c.project_id).where(runs.c.id == run_id)).scalar_one()
                if owner != project_id:
                    raise TrimtabError(ErrorCode.RUN_CONFLICT, f"run {hello.run.uid} belongs to another project")
                values: dict[str, Any] = {"last_seen_at": now}
                if not hello.replay:
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
        inserted = conn.execute(
            insert_(table).values(**ident, **extra).on_conflict_do_nothing(index_elements=conflict)
        ).rowcount
        return int(conn.execute(select(table.c.id).where(*where)).scalar_one()), inserted == 1

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

    def touch_run(self, run_id: int, drops: dict[str, int] | None = None) -> None:
        values: dict[str, Any] = {"last_seen_at": time.time()}
        if drops:
            values["drops"] = drops
        with self.transaction() as conn:
            conn.execute(update(runs).where(runs.c.id == run_id).values(**values))

    def finish_run(self, run_id: int, drops: dict[str, int] | None = None) -> None:
        now = time.time()
        values: dict[str, Any] = {"status": "finished", "finished_at": now, "last_seen_at": now}
        if drops is not None:
            values["drops"] = drops
        with self.transaction() as conn:
            conn.execute(update(runs).where(runs.c.id == run_id).values(**values))

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
        if out["status"] == "running" and time.time() - out["last_seen_at"] > self.stale_after_s:
            out["status"] = "stale"  # heartbeats stopped; the run may still come back
        return out

    @staticmethod
    def _require_run(conn: Connection, run_id: int) -> None:
        if conn.execute(select(runs.c.id).where(runs.c.id == run_id)).first() is None:
            raise TrimtabError(ErrorCode.RUN_NOT_FOUND, f"no run with id {run_id}")

    def list_keys(self, run_id: int) -> list[dict[str, Any]]:
        run_keys = select(metric_keys.c.id).where(metric_keys.c.run_id == run_id, metric_keys.c.kind == "scalar")
        stats = (
            select(scalar_points.c.key_id, func.count().label("n"), func.max(scalar_points.c.step).label("last_step"))
            .where(scalar_points.c.key_id.in_(run_keys))
            .group_by(scalar_points.c.key_id)
            .subquery()
        )
        query = (
            select(metric_keys.c.name, metric_keys.c.kind, stats.c.n, stats.c.last_step)
            .select_from(metric_keys.outerjoin(stats, stats.c.key_id == metric_keys.c.id))
            .where(metric_keys.c.run_id == run_id)
            .order_by(metric_keys.c.kind, metric_keys.c.name)
        )
        with self.transaction() as conn:
            self._require_run(conn, run_id)
            return [
                {"key": r.name, "kind": r.kind, "count": int(r.n or 0), "last_step": r.last_step}
                for r in conn.execute(query)
            ]

    def scalar_rows(self, run_id: int, key: str, since_step: int | None, end_step: int | None) -> ScalarRows:
        with self.transaction() as conn:
            self._require_run(conn, run_id)
            key_id = conn.execute(
                select(metric_keys.c.id).where(
                    metric_keys.c.run_id == run_id, metric_keys.c.kind == "scalar", metric_keys.c.name == key
                )
            ).scalar()
            if key_id is None:
                raise TrimtabError(ErrorCode.KEY_NOT_FOUND, f"run {run_id} has no scalar key {key!r}")
            cond = [scalar_points.c.key_id == key_id]
            if since_step is not None:
                cond.append(scalar_points.c.step > since_step)
            if end_step is not None:
                cond.append(scalar_points.c.step <= end_step)
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
