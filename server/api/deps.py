"""What every handler shares: the server context, the scope check, error models, common
parameter types and the JSON encoding of hand-built responses."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from trimtab.protocol import INT32_MAX, INT64_MAX, INT64_MIN
from trimtab.server.context import ServerContext
from trimtab.server.tokens import Principal


def context(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.trimtab
    return ctx


Ctx = Annotated[ServerContext, Depends(context)]


def require(scope: str) -> Any:
    """A dependency that authenticates the request's bearer token for ``scope`` (in a thread:
    the token check reads the database)."""

    async def dependency(request: Request, ctx: Ctx) -> Principal:
        return await run_in_threadpool(ctx.auth.authenticate, request.headers.get("authorization"), scope)

    return Depends(dependency)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
}

NoNul = r"^[^\x00]*$"
RunId = Annotated[int, Path(ge=1, le=INT64_MAX, description="the run's id (`GET /runs`)")]
Step = Annotated[int | None, Query(ge=INT64_MIN, le=INT64_MAX)]
Key = Annotated[str, Query(min_length=1, max_length=256, pattern=NoNul)]
Rank = Annotated[int, Query(ge=0, le=INT32_MAX, description="the process rank whose series to read")]


def iso(ts: float | None) -> str | None:
    """A stored epoch time as ISO 8601 (UTC)."""
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def json_bytes(body: Any) -> bytes:
    """A hand-built response body: compact JSON, non-finite floats refused (spell them first)."""
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
