"""REST ``/api/v1`` over runs and their data: runs, keys, scalars, histograms, events."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from trimtab.jsonsafe import float_to_json, to_json
from trimtab.protocol import INT32_MAX, INT64_MAX
from trimtab.server.api.deps import ERRORS, Ctx, Key, NoNul, Rank, RunId, Step, iso, json_bytes, require
from trimtab.server.context import ServerContext

DEFAULT_MAX_POINTS = 10_000
MAX_MAX_POINTS = 2_000_000
DEFAULT_ROWS = 1000  # histograms and events per response
MAX_ROWS = 10_000


# ---------------------------------------------------------------- response models (for /docs)


class RunOut(BaseModel):
    id: int
    uid: str
    project: str
    name: str | None
    status: str  # running | finished | stale (heartbeats stopped; may resume)
    created_at: str
    last_seen_at: str
    finished_at: str | None
    host: str
    agent_version: str
    world_size: int
    n_points: int
    n_histograms: int
    n_events: int
    last_step: int | None
    drops: dict[str, int]
    config: dict[str, Any]


class KeyOut(BaseModel):
    key: str
    kind: str  # scalar | histogram
    rank: int
    count: int  # points (scalar) or histograms
    last_step: int | None


class ScalarsOut(BaseModel):
    run_id: int
    key: str
    rank: int
    steps: list[int]
    wall_times: list[float | str]
    values: list[float | str]  # numbers, or "NaN" / "Infinity" / "-Infinity"
    total_points: int  # points in the requested range, not only those returned
    downsampled: bool
    bucket_steps: int  # steps per bucket of the view; 1 when the points are raw
    nonfinite: dict[str, int]  # of the points in the range: {"nan", "posinf", "neginf"}


class HistogramOut(BaseModel):
    step: int
    wall_time: float
    edges: list[float]  # len(counts) + 1, finite, non-decreasing
    counts: list[int]
    nan: int  # values outside the bins: NaN, +Inf, -Inf
    pinf: int
    ninf: int


class HistogramsOut(BaseModel):
    run_id: int
    key: str
    rank: int
    histograms: list[HistogramOut]
    truncated: bool


class EventOut(BaseModel):
    id: int
    rank: int
    step: int | None
    wall_time: float
    kind: str
    level: str
    data: dict[str, Any]


router = APIRouter(prefix="/api/v1", responses=ERRORS)


def _run_out(run: dict[str, Any]) -> RunOut:
    return RunOut(
        **{
            **run,
            "created_at": iso(run["created_at"]),
            "last_seen_at": iso(run["last_seen_at"]),
            "finished_at": iso(run["finished_at"]),
            "drops": run["drops"] or {},
            "config": to_json(run["config"]),
        }
    )


@router.get("/runs", response_model=list[RunOut], dependencies=[require("read")])
async def list_runs(
    ctx: Ctx,
    project: Annotated[str | None, Query(max_length=128, pattern=NoNul)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
) -> list[RunOut]:
    """The runs, newest first, optionally of one project, a page of `limit` from `offset`."""
    rows = await run_in_threadpool(ctx.store.list_runs, project, limit, offset)
    return [_run_out(r) for r in rows]


SinceStep = Annotated[Step, Query(description="only steps strictly after this one")]
EndStep = Annotated[Step, Query(description="only steps up to and including this one")]
Limit = Annotated[int, Query(ge=1, le=MAX_ROWS)]


@router.get("/runs/{run_id}", response_model=RunOut, dependencies=[require("read")])
async def get_run(ctx: Ctx, run_id: RunId) -> RunOut:
    """One run: status (running, finished, or stale when its heartbeats stopped), counts, last
    step, drops the agent reported, world size and config."""
    return _run_out(await run_in_threadpool(ctx.store.get_run, run_id))


@router.get("/runs/{run_id}/keys", response_model=list[KeyOut], dependencies=[require("read")])
async def list_keys(
    ctx: Ctx,
    run_id: RunId,
    rank: Annotated[int | None, Query(ge=0, le=INT32_MAX, description="only this rank's keys")] = None,
) -> list[KeyOut]:
    """Every scalar and histogram key of the run, per rank, with its row count and last step."""
    return [KeyOut(**k) for k in await run_in_threadpool(ctx.store.list_keys, run_id, rank)]


@router.get("/runs/{run_id}/scalars", response_model=ScalarsOut, dependencies=[require("read")])
async def get_scalars(
    ctx: Ctx,
    run_id: RunId,
    key: Key,
    since_step: Annotated[Step, Query(description="only steps strictly after this one (for live polling)")] = None,
    start_step: Annotated[Step, Query(description="only steps from this one on (inclusive)")] = None,
    end_step: EndStep = None,
    max_points: Annotated[
        int, Query(ge=2, le=MAX_MAX_POINTS, description="at most this many points; more are downsampled")
    ] = DEFAULT_MAX_POINTS,
    rank: Rank = 0,
) -> Response:
    """One scalar key's points in the step range, in step order, at most `max_points`.

    When the range holds more, it is cut into buckets of `bucket_steps` steps (a power of
    two) and each bucket shows its finite minimum and maximum points and its first NaN,
    +Inf and -Inf, at their real steps: spikes and non-finite values are never averaged
    away. `total_points` and `nonfinite` count every point in the range. Built from
    precomputed rollups, so a million-step series costs about as much as a short one.
    """
    lo = since_step + 1 if since_step is not None else None
    if start_step is not None:
        lo = start_step if lo is None else max(lo, start_step)
    body = await run_in_threadpool(_scalars_body, ctx, run_id, key, lo, end_step, max_points, rank)
    # Built by hand: JSON has no NaN, and validating a million floats through pydantic is slow.
    return Response(body, media_type="application/json")


def _scalars_body(
    ctx: ServerContext, run_id: int, key: str, start: int | None, end: int | None, max_points: int, rank: int
) -> bytes:
    """The response for steps ``start``..``end`` (inclusive; None: unbounded)."""
    view = ctx.store.scalar_view(run_id, key, start, end, max_points, rank)
    return json_bytes(
        {
            "run_id": run_id,
            "key": key,
            "rank": rank,
            "steps": view.steps,
            "wall_times": [float_to_json(w) for w in view.walls],
            "values": [float_to_json(v) for v in view.values],
            "total_points": view.total_points,
            "downsampled": view.downsampled,
            "bucket_steps": view.bucket_steps,
            "nonfinite": view.nonfinite,
        }
    )


@router.get("/runs/{run_id}/histograms", response_model=HistogramsOut, dependencies=[require("read")])
async def get_histograms(
    ctx: Ctx,
    run_id: RunId,
    key: Key,
    since_step: SinceStep = None,
    end_step: EndStep = None,
    rank: Rank = 0,
    limit: Annotated[Limit, Query(description="at most this many; the newest when more match")] = DEFAULT_ROWS,
) -> Response:
    """One histogram key's histograms in the step range, ordered by step.

    When more than `limit` match, the **newest** `limit` are returned and `truncated` is true:
    a live view polling with `since_step` (the last step it has) always gets the latest
    histograms, even after falling behind. To read further back, ask again with `end_step`
    below the first step returned.
    """
    body = await run_in_threadpool(_histograms_body, ctx, run_id, key, rank, since_step, end_step, limit)
    return Response(body, media_type="application/json")


def _histograms_body(
    ctx: ServerContext, run_id: int, key: str, rank: int, since: int | None, end: int | None, limit: int
) -> bytes:
    page = ctx.store.histogram_rows(run_id, key, rank, since, end, limit)
    return json_bytes(
        {
            "run_id": run_id,
            "key": key,
            "rank": rank,
            "histograms": [
                {
                    "step": h.step,
                    "wall_time": h.wall_time,
                    "edges": [float_to_json(x) for x in h.edges],  # finite since ingest checks them
                    "counts": h.counts,
                    "nan": h.nan,
                    "pinf": h.pinf,
                    "ninf": h.ninf,
                }
                for h in page.rows
            ],
            "truncated": page.truncated,
        }
    )


@router.get("/runs/{run_id}/events", response_model=list[EventOut], dependencies=[require("read")])
async def list_events(
    ctx: Ctx,
    run_id: RunId,
    kind: Annotated[str | None, Query(min_length=1, max_length=64, pattern=NoNul)] = None,
    level: Annotated[str | None, Query(min_length=1, max_length=16, pattern=NoNul)] = None,
    rank: Annotated[int | None, Query(ge=0, le=INT32_MAX, description="only this rank's events")] = None,
    since_step: Annotated[Step, Query(description="only events at steps strictly after this one")] = None,
    after_id: Annotated[int | None, Query(ge=0, le=INT64_MAX, description="only events with a larger id")] = None,
    limit: Annotated[Limit, Query(description="at most this many, the first after `after_id`")] = DEFAULT_ROWS,
) -> Response:
    """The run's events that match every filter given, ordered by id, at most `limit`.

    To page through them or to poll for new ones, pass the last `id` received as `after_id`.
    With `since_step`, events logged without a step are left out.
    """

    def body() -> bytes:
        return json_bytes(
            ctx.store.event_rows(
                run_id, kind=kind, level=level, rank=rank, since_step=since_step, after_id=after_id, limit=limit
            )
        )

    return Response(await run_in_threadpool(body), media_type="application/json")
