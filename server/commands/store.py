"""The commands' SQL: create (idempotent by id), read and list, the open commands to deliver,
expiry, and the agents' results (per rank; the command's own status follows rank 0).

Blocking: the REST handlers, the agent socket and the delivery sweep call it from worker
threads. A command's status moves pending -> delivered -> applied | rejected, or to expired
while it is not final; a final status never changes again.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from sqlalchemy import Connection, and_, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from trimtab.errors import ErrorCode, TrimtabError
from trimtab.jsonsafe import to_json
from trimtab.protocol import APPLIED, DELIVERED, REJECTED, CmdResult
from trimtab.server.commands.kinds import CommandRequest
from trimtab.server.db.store import Store
from trimtab.server.db.tables import commands, runs

logger = logging.getLogger("trimtab.server")

PENDING, EXPIRED = "pending", "expired"  # the server's own; the agent reports the others
STATUSES = (PENDING, DELIVERED, APPLIED, REJECTED, EXPIRED)
OPEN = (PENDING, DELIVERED)
FINAL = frozenset({APPLIED, REJECTED, EXPIRED})
AGENT_STATUSES = frozenset({DELIVERED, APPLIED, REJECTED})  # what a cmd_result may say
HUMAN, AUTOPILOT = "human", "autopilot"
SOURCES = (HUMAN, AUTOPILOT)
MAX_DETAIL_BYTES = 64 * 1024  # an agent's detail above this is stored cut, as text
RUN_IDS_PER_QUERY = 500


@dataclass(frozen=True)
class Command:
    id: str
    run_id: int
    kind: str
    args: dict[str, Any]
    status: str
    source: str
    created_by: str
    created_at: float
    expires_at: float
    delivered_at: float | None
    finished_at: float | None
    step: int | None
    detail: dict[str, Any] | None
    ranks: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "run_id": self.run_id,
            "kind": self.kind,
            "args": self.args,
            "status": self.status,
            "source": self.source,
            "created_by": self.created_by,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "delivered_at": _iso(self.delivered_at),
            "finished_at": _iso(self.finished_at),
            "step": self.step,
            "detail": self.detail,
            "ranks": self.ranks,
        }


@dataclass(frozen=True)
class CommandFilter:
    status: str | None = None
    source: str | None = None
    after: str | None = None  # the last id of the previous page
    newest_first: bool = False
    limit: int = 100


class Outcome(str, Enum):
    """What became of an agent's ``cmd_result`` (for the log and the tests)."""

    RECORDED = "recorded"  # a rank's result; the command's status moved if it was rank 0's
    DUPLICATE = "duplicate"  # that rank had already reported this (or a final) result
    AUTOPILOT = "autopilot"  # an automatic action, inserted as a command
    UNKNOWN = "unknown"  # no such command of this run: ignored
    INVALID = "invalid"  # a status or autopilot report the server cannot take: ignored


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def _command(row: Any) -> Command:
    return Command(**{c.name: getattr(row, c.name) for c in commands.columns})


# ---------------------------------------------------------------- REST side


def create(store: Store, run_id: int, request: CommandRequest, created_by: str) -> tuple[Command, bool]:
    """Store a new pending command; (command, created). The same id again returns the stored
    command when its kind and args are the same, and is ``command_conflict`` otherwise."""
    with store.transaction() as conn:
        return create_in(store, conn, run_id, request, created_by)


def create_in(
    store: Store, conn: Connection, run_id: int, request: CommandRequest, created_by: str
) -> tuple[Command, bool]:
    """``create`` within the caller's transaction (an autopilot policy stores its command
    with the policy change that caused it)."""
    ident = request.id or uuid.uuid4().hex
    now = time.time()
    status = conn.execute(select(runs.c.status).where(runs.c.id == run_id)).scalar()
    if status is None:
        raise TrimtabError(ErrorCode.RUN_NOT_FOUND, f"no run with id {run_id}")
    if request.id is not None:
        existing = _get(conn, ident)
        if existing is not None:
            return _same(existing, run_id, request), False
    if status == "finished":
        raise TrimtabError(
            ErrorCode.RUN_FINISHED, f"run {run_id} has finished: there is no training loop left to steer"
        )
    row = {
        "id": ident,
        "run_id": run_id,
        "kind": request.kind,
        "args": request.args,
        "status": PENDING,
        "source": HUMAN,
        "created_by": created_by[:128],
        "created_at": now,
        "expires_at": now + request.expires_in_s,
        "ranks": {},
    }
    if _insert(store, conn, row):
        created = _get(conn, ident)
        assert created is not None
        return created, True
    raced = _get(conn, ident)  # a concurrent request with the same id got there first
    assert raced is not None
    return _same(raced, run_id, request), False


def _same(existing: Command, run_id: int, request: CommandRequest) -> Command:
    if existing.run_id != run_id:
        raise TrimtabError(
            ErrorCode.COMMAND_CONFLICT, f"command id {existing.id!r} is already used by a command of another run"
        )
    if existing.kind != request.kind or existing.args != request.args:
        raise TrimtabError(
            ErrorCode.COMMAND_CONFLICT,
            f"command {existing.id!r} exists with kind {existing.kind!r} and args {json.dumps(existing.args)}: "
            "a retry must repeat them; use a new id for a new command",
        )
    return existing


def _insert(store: Store, conn: Connection, row: dict[str, Any]) -> bool:
    insert_ = sqlite_insert if store.sqlite else pg_insert
    stmt = insert_(commands).values(**row).on_conflict_do_nothing(index_elements=["id"])
    # RETURNING, not rowcount: psycopg reports -1 rows for an INSERT through SQLAlchemy
    return conn.execute(stmt.returning(commands.c.id)).first() is not None


def _get(conn: Connection, ident: str) -> Command | None:
    row = conn.execute(select(commands).where(commands.c.id == ident)).first()
    return None if row is None else _command(row)


def get(store: Store, run_id: int, ident: str) -> Command:
    with store.transaction() as conn:
        command = _get(conn, ident)
        if command is None or command.run_id != run_id:
            _require_run(conn, run_id)
            raise TrimtabError(ErrorCode.COMMAND_NOT_FOUND, f"run {run_id} has no command {ident!r}")
        return command


def list_commands(store: Store, run_id: int, f: CommandFilter) -> list[Command]:
    """The run's commands in creation order (``newest_first`` reverses it), filtered, at most
    ``f.limit``; ``f.after`` continues after that command in the same order."""
    c = commands.c
    query = select(commands).where(c.run_id == run_id)
    if f.status is not None:
        query = query.where(c.status == f.status)
    if f.source is not None:
        query = query.where(c.source == f.source)
    with store.transaction() as conn:
        _require_run(conn, run_id)
        if f.after is not None:
            cursor = _get(conn, f.after)
            if cursor is None or cursor.run_id != run_id:
                raise TrimtabError(ErrorCode.INVALID_REQUEST, f"after: run {run_id} has no command {f.after!r}")
            if f.newest_first:
                later = or_(c.created_at < cursor.created_at, and_(c.created_at == cursor.created_at, c.id < cursor.id))
            else:
                later = or_(c.created_at > cursor.created_at, and_(c.created_at == cursor.created_at, c.id > cursor.id))
            query = query.where(later)
        order = (c.created_at.desc(), c.id.desc()) if f.newest_first else (c.created_at, c.id)
        return [_command(r) for r in conn.execute(query.order_by(*order).limit(f.limit))]


def _require_run(conn: Connection, run_id: int) -> None:
    if conn.execute(select(runs.c.id).where(runs.c.id == run_id)).first() is None:
        raise TrimtabError(ErrorCode.RUN_NOT_FOUND, f"no run with id {run_id}")


# ---------------------------------------------------------------- delivery side


def open_commands(store: Store, run_ids: list[int], now: float | None = None) -> list[Command]:
    """The runs' commands that are not final and not expired, oldest first: what an agent of
    these runs should have. Human commands only (an autopilot row is always final)."""
    now = time.time() if now is None else now
    found: list[Command] = []
    c = commands.c
    with store.transaction() as conn:
        for start in range(0, len(run_ids), RUN_IDS_PER_QUERY):
            chunk = run_ids[start : start + RUN_IDS_PER_QUERY]
            query = (
                select(commands)
                .where(c.run_id.in_(chunk), c.status.in_(OPEN), c.expires_at > now)
                .order_by(c.created_at, c.id)
            )
            found.extend(_command(r) for r in conn.execute(query))
    found.sort(key=lambda cmd: (cmd.created_at, cmd.id))
    return found


def expire(store: Store, now: float | None = None) -> int:
    """Mark every command still pending or delivered past its ``expires_at`` as expired."""
    now = time.time() if now is None else now
    c = commands.c
    overdue = (c.status.in_(OPEN), c.expires_at <= now)
    with store.transaction() as conn:
        # Read first: an UPDATE would take SQLite's write lock every sweep, even with nothing to do.
        if conn.execute(select(c.id).where(*overdue).limit(1)).first() is None:
            return 0
        done = conn.execute(
            update(commands)
            .where(*overdue)
            .values(status=EXPIRED, finished_at=now, detail={"reason": "expired before the agent applied it"})
        )
        return int(done.rowcount or 0)


def record_result(store: Store, run_id: int, rank: int, result: CmdResult) -> Outcome:
    """Take an agent's ``cmd_result``: the rank's entry in ``ranks``, and for rank 0 the
    command's status (pending -> delivered -> applied | rejected). An unknown id reported as
    ``detail.source == "autopilot"`` is an automatic action: it becomes a command row."""
    if result.status not in AGENT_STATUSES:
        logger.warning("run %s rank %d: command %r: unknown result status %r", run_id, rank, result.id, result.status)
        return Outcome.INVALID
    if len(result.id) > 64 or "\x00" in result.id:
        logger.warning("run %s rank %d: result for an id no command can have: %r", run_id, rank, result.id[:80])
        return Outcome.UNKNOWN
    detail = storable(result.detail)
    now = time.time()
    with store.transaction() as conn:
        command = _locked(store, conn, result.id)
        if command is None:
            if detail.get("source") != AUTOPILOT:
                logger.warning("run %s rank %d: result for unknown command %r ignored", run_id, rank, result.id)
                return Outcome.UNKNOWN
            problem = _autopilot_problem(result, detail)
            if problem is not None:
                logger.warning("run %s rank %d: autopilot report %r not recorded: %s", run_id, rank, result.id, problem)
                return Outcome.INVALID
            if _insert(store, conn, _autopilot_row(run_id, rank, result, detail, now)):
                logger.info("run %s rank %d: autopilot %s at step %s", run_id, rank, result.status, result.step)
                return Outcome.AUTOPILOT
            command = _locked(store, conn, result.id)  # another connection inserted it meanwhile
            assert command is not None
        if command.run_id != run_id:
            logger.warning(
                "run %s rank %d: result for command %r of run %s ignored", run_id, rank, result.id, command.run_id
            )
            return Outcome.UNKNOWN
        key = str(rank)
        before = (command.ranks.get(key) or {}).get("status")
        # a rank's final result never changes; 'delivered' counts once, and never after a final one
        if before in FINAL or (result.status == DELIVERED and before is not None):
            return Outcome.DUPLICATE
        ranks = {**command.ranks, key: {"status": result.status, "step": result.step, "detail": detail or None}}
        values: dict[str, Any] = {"ranks": ranks}
        if rank == 0 and command.status not in FINAL:
            if command.delivered_at is None:
                values["delivered_at"] = now
            if result.status == DELIVERED:
                values["status"] = DELIVERED
            else:
                values.update(status=result.status, step=result.step, detail=detail, finished_at=now)
        elif command.status in FINAL and result.status != DELIVERED:
            logger.info(
                "run %s rank %d: command %s is already %s; rank %d's %s is kept in its ranks",
                run_id,
                rank,
                command.id,
                command.status,
                rank,
                result.status,
            )
        conn.execute(update(commands).where(commands.c.id == command.id).values(**values))
        return Outcome.RECORDED


def _locked(store: Store, conn: Connection, ident: str) -> Command | None:
    """The command, with its row locked for this transaction (two ranks' results for one
    command must not overwrite each other's entry in ``ranks``)."""
    if store.sqlite:
        # An UPDATE first takes SQLite's write lock (waiting for it), so the read below sees
        # every committed write; a SELECT first would read outside any transaction.
        conn.execute(update(commands).where(commands.c.id == ident).values(id=commands.c.id))
        return _get(conn, ident)
    row = conn.execute(select(commands).where(commands.c.id == ident).with_for_update()).first()
    return None if row is None else _command(row)


def _autopilot_problem(result: CmdResult, detail: dict[str, Any]) -> str | None:
    """Why an automatic action cannot be recorded, or None. Its kind and args are recorded as
    the agent reports them (the audit shows what was done), as long as they can be stored."""
    kind, args = detail.get("kind"), detail.get("args")
    if result.status == DELIVERED:
        return "an automatic action is reported once applied or rejected, never as delivered"
    if not isinstance(kind, str) or not 0 < len(kind) <= 64:
        return f"detail.kind must be a command kind of 1-64 characters, got {kind!r}"
    if args is not None and not isinstance(args, dict):
        return "detail.args must be a map"
    return None


def _autopilot_row(run_id: int, rank: int, result: CmdResult, detail: dict[str, Any], now: float) -> dict[str, Any]:
    entry = {"status": result.status, "step": result.step, "detail": detail}
    return {
        "id": result.id,
        "run_id": run_id,
        "kind": detail["kind"],
        "args": detail.get("args") or {},
        "status": result.status,
        "source": AUTOPILOT,
        "created_by": AUTOPILOT,
        "created_at": now,
        "expires_at": now,  # never delivered: it happened on the agent
        "delivered_at": now,
        "finished_at": now,
        "step": result.step,
        "detail": detail,
        "ranks": {str(rank): entry},
    }


def storable(detail: dict[str, Any]) -> dict[str, Any]:
    """An agent's detail made storable (``trimtab.jsonsafe``); past ``MAX_DETAIL_BYTES`` of
    JSON, a cut text of it."""
    safe = to_json(detail)
    assert isinstance(safe, dict)
    text = json.dumps(safe, separators=(",", ":"))
    if len(text) > MAX_DETAIL_BYTES:
        return {"truncated": True, "json_bytes": len(text), "head": text[:4096]}
    return safe
