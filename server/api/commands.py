"""REST for commands: send one to a run (scope ``control``), read them back (``read``).

A new command is stored pending and pushed at once to the run's agents connected to this
process (``CommandHub``); see docs/commands.md for the kinds, their arguments and the lifecycle.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from trimtab.server.api.deps import ERRORS, Ctx, ErrorResponse, NoNul, RunId, require
from trimtab.server.commands import store as db
from trimtab.server.commands.kinds import parse_request
from trimtab.server.tokens import Principal

router = APIRouter(prefix="/api/v1", responses={**ERRORS, 409: {"model": ErrorResponse}}, tags=["commands"])

CommandId = Annotated[str, Path(min_length=1, max_length=64, pattern=NoNul, description="the command's id")]
CommandBody = Annotated[
    Any,
    Body(
        description="kind (reduce_lr, set_lr, set_hparams, skip_batches, rollback, checkpoint, pause, resume, stop, "
        "set_autopilot, or a kind the training script registered), args, optionally id (for idempotent retries) "
        "and expires_in_s (default 3600, at most 7 days); docs/commands.md",
        examples=[{"kind": "reduce_lr", "args": {"factor": 0.5}}, {"kind": "skip_batches", "args": {"n": 3}}],
    ),
]


class RankResult(BaseModel):
    status: str  # delivered | applied | rejected
    step: int | None
    detail: dict[str, Any] | None


class CommandOut(BaseModel):
    id: str
    run_id: int
    kind: str
    args: dict[str, Any]
    status: str  # pending | delivered | applied | rejected | expired
    source: str  # human | autopilot
    created_by: str  # the token's name, or "autopilot"
    created_at: str
    expires_at: str
    delivered_at: str | None
    finished_at: str | None
    step: int | None  # where it took effect on rank 0
    detail: dict[str, Any] | None  # rank 0's before/after summary, or the reason it was rejected or expired
    ranks: dict[str, RankResult]  # every rank's own result, by rank


@router.post(
    "/runs/{run_id}/commands",
    response_model=CommandOut,
    status_code=201,
    responses={200: {"model": CommandOut, "description": "the same id was sent before: the stored command"}},
)
async def post_command(
    ctx: Ctx,
    run_id: RunId,
    body: CommandBody,
    response: Response,
    principal: Annotated[Principal, require("control")],
) -> dict[str, Any]:
    """Send a command to the run's training loop. It is stored `pending`, delivered to every
    rank's agent (now, or when it reconnects before `expires_in_s`), applied at the next step
    boundary and acknowledged. Repeating an `id` with the same kind and args returns the stored
    command (200); with others it is `command_conflict` (409). A finished run is `run_finished` (409)."""
    request = parse_request(body)
    command, created = await run_in_threadpool(db.create, ctx.store, run_id, request, principal.name)
    if created:
        if ctx.commands is not None:
            ctx.commands.push(command)
    else:
        response.status_code = 200
    return command.to_json()


@router.get("/runs/{run_id}/commands", response_model=list[CommandOut], dependencies=[require("read")])
async def list_commands(
    ctx: Ctx,
    run_id: RunId,
    status: Annotated[str | None, Query(pattern="^(" + "|".join(db.STATUSES) + ")$")] = None,
    source: Annotated[str | None, Query(pattern="^(" + "|".join(db.SOURCES) + ")$")] = None,
    after: Annotated[
        str | None, Query(min_length=1, max_length=64, pattern=NoNul, description="the last id of the previous page")
    ] = None,
    order: Annotated[str, Query(pattern="^(oldest|newest)$", description="by creation time")] = "oldest",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Who sent what and when, its status, and the step where it took effect: the run's
    commands (automatic ones too, `source: autopilot`), oldest first (`order=newest` for the
    latest first), at most `limit`. The next page: `after=<the last id received>`."""
    f = db.CommandFilter(status=status, source=source, after=after, newest_first=order == "newest", limit=limit)
    return [c.to_json() for c in await run_in_threadpool(db.list_commands, ctx.store, run_id, f)]


@router.get("/runs/{run_id}/commands/{command_id}", response_model=CommandOut, dependencies=[require("read")])
async def get_command(ctx: Ctx, run_id: RunId, command_id: CommandId) -> dict[str, Any]:
    """One command of the run: its status (pending, delivered, applied, rejected, expired), the step
    it took effect at, and each rank's result."""
    return (await run_in_threadpool(db.get, ctx.store, run_id, command_id)).to_json()
