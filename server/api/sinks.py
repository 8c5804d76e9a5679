"""REST ``/api/v1/sinks``: where alerts go (Slack incoming webhooks, signed generic webhooks)."""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from trimtab.protocol import INT64_MAX
from trimtab.server.alerts import messages as notify
from trimtab.server.alerts.delivery import build_request, make_client, send
from trimtab.server.alerts.sinks import MIN_SECRET_CHARS, NAME_LIMIT, SinkStore, check_url, new_secret
from trimtab.server.api.deps import ERRORS, Ctx, NoNul, iso, require

router = APIRouter(prefix="/api/v1", responses=ERRORS, tags=["sinks"])

SinkId = Annotated[int, Path(ge=1, le=INT64_MAX, description="the sink's id (`GET /sinks`)")]


class SinkIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["slack", "webhook"]
    url: str = Field(min_length=1, max_length=2048, description="http(s) URL the alerts are POSTed to")
    secret: str | None = Field(
        default=None,
        min_length=MIN_SECRET_CHARS,
        max_length=256,
        pattern=NoNul,
        description="webhook only: the HMAC key; omitted, the server generates one and returns it once",
    )
    project: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=NoNul, description="only this project's alerts"
    )
    name: str | None = Field(default=None, min_length=1, max_length=NAME_LIMIT, pattern=NoNul)
    enabled: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return check_url(url)

    @model_validator(mode="after")
    def _secret_fits_kind(self) -> SinkIn:
        if self.kind == "slack" and self.secret is not None:
            raise ValueError("a slack sink takes no secret: its URL is the secret")
        return self


class DeliveryCounts(BaseModel):
    pending: int
    delivered: int
    dead: int


class SinkOut(BaseModel):
    id: int
    kind: str
    name: str
    url: str  # masked: a Slack URL's path, credentials and query strings are hidden
    has_secret: bool
    project: str | None  # None: alerts of every project
    enabled: bool
    created_at: str
    deliveries: DeliveryCounts
    last_error: str | None  # of the latest delivery that failed an attempt


class SinkCreated(SinkOut):
    secret: str | None = None  # only when the server generated it: shown this once


class TestOut(BaseModel):
    delivered: bool  # the receiver answered 2xx
    status: int | None  # its HTTP status, None when it did not answer
    error: str | None


def _out(sink: dict[str, Any]) -> dict[str, Any]:
    return {**sink, "created_at": iso(sink["created_at"])}


@router.post("/sinks", response_model=SinkCreated, status_code=201, dependencies=[require("admin")])
async def create_sink(ctx: Ctx, body: SinkIn) -> SinkCreated:
    """Add a sink. Every alert of its project (of every project when `project` is omitted)
    is sent to it from now on. A webhook sink signs each request with its secret (see
    docs/webhooks.md); without `secret`, the server makes one and returns it here, once."""
    generated = new_secret() if body.kind == "webhook" and body.secret is None else None
    sink = await run_in_threadpool(
        SinkStore(ctx.store).create,
        body.kind,
        body.url,
        body.secret or generated,
        body.project,
        body.name,
        body.enabled,
    )
    return SinkCreated(**_out(sink), secret=generated)


@router.get("/sinks", response_model=list[SinkOut], dependencies=[require("read")])
async def list_sinks(ctx: Ctx) -> list[SinkOut]:
    """Every alert sink with its delivery counts; URLs show scheme, host and port only."""
    return [SinkOut(**_out(s)) for s in await run_in_threadpool(SinkStore(ctx.store).all)]


@router.get("/sinks/{sink_id}", response_model=SinkOut, dependencies=[require("read")])
async def get_sink(ctx: Ctx, sink_id: SinkId) -> SinkOut:
    """One alert sink, its delivery counts and its last error."""
    return SinkOut(**_out(await run_in_threadpool(SinkStore(ctx.store).get, sink_id)))


@router.delete("/sinks/{sink_id}", status_code=204, dependencies=[require("admin")])
async def delete_sink(ctx: Ctx, sink_id: SinkId) -> Response:
    """Remove the sink and its deliveries, including any not sent yet."""
    await run_in_threadpool(SinkStore(ctx.store).delete, sink_id)
    return Response(status_code=204)


@router.post("/sinks/{sink_id}/test", response_model=TestOut, dependencies=[require("admin")])
async def test_sink(ctx: Ctx, sink_id: SinkId) -> TestOut:
    """Send a test message now (event `test`, signed like a real one) and report the
    receiver's answer. Nothing is queued or retried."""
    target = await run_in_threadpool(SinkStore(ctx.store).target, sink_id)
    alert = notify.sample_alert(sink_id, ctx.settings.base_url)
    request = build_request(target.kind, target.secret, "test", f"test-{secrets.token_hex(8)}", alert)
    async with make_client(ctx.settings) as client:
        outcome = await send(client, target.url, request, ctx.settings.delivery_timeout_s)
    return TestOut(delivered=outcome.delivered, status=outcome.status, error=outcome.error)
