"""REST for autopilot policies, per project and per run: read (scope ``read``), set and remove
(``control``). A change that alters a run's effective policy stores a ``set_autopilot``
command for it, which is pushed here at once like a POSTed command; see docs/commands.md."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from trimtab.server.api.commands import CommandOut
from trimtab.server.api.deps import ERRORS, Ctx, ErrorResponse, NoNul, RunId, require
from trimtab.server.commands import policies
from trimtab.server.commands.policies import PolicyView, check_policy
from trimtab.server.context import ServerContext
from trimtab.server.tokens import Principal

router = APIRouter(prefix="/api/v1", responses={**ERRORS, 409: {"model": ErrorResponse}}, tags=["autopilot"])

ProjectName = Annotated[
    str, Path(min_length=1, max_length=128, pattern=NoNul, description="the project's name (as runs report it)")
]
PolicyBody = Annotated[
    Any,
    Body(
        description='{"enabled": bool (default true), <AutopilotOptions field>: value, ...}; fields left out '
        "take the agent's defaults (docs/commands.md#autopilot-policies)",
        examples=[{"enabled": True, "spike_z": 20, "max_skips_in_row": 5}, {"enabled": False}],
    ),
]


class PolicyOut(BaseModel):
    project: str
    run_id: int | None  # null for a project's policy
    source: str  # run | project | none: where the policy in force comes from
    policy: dict[str, Any] | None  # null: none in force
    updated_at: str | None
    updated_by: str | None  # the name of the token that set it
    commands: list[CommandOut]  # the set_autopilot commands this change sent (writes only)


def _pushed(ctx: ServerContext, view: PolicyView) -> dict[str, Any]:
    if ctx.commands is not None:
        for command in view.commands:
            ctx.commands.push(command)
    return view.to_json()


@router.get("/projects/{project}/autopilot", response_model=PolicyOut, dependencies=[require("read")])
async def get_project_policy(ctx: Ctx, project: ProjectName) -> dict[str, Any]:
    """The project's autopilot policy (`source: none` when it has none)."""
    return (await run_in_threadpool(policies.get_project, ctx.store, project)).to_json()


@router.put("/projects/{project}/autopilot", response_model=PolicyOut)
async def put_project_policy(
    ctx: Ctx, project: ProjectName, body: PolicyBody, principal: Annotated[Principal, require("control")]
) -> dict[str, Any]:
    """Set the project's policy (the project is created if it has no runs yet). Every run of
    the project still going, without a policy of its own, is sent it when it changes; every
    run created later gets it at its first step boundaries."""
    policy = check_policy(body)
    return _pushed(ctx, await run_in_threadpool(policies.put_project, ctx.store, project, policy, principal.name))


@router.delete("/projects/{project}/autopilot", response_model=PolicyOut)
async def delete_project_policy(
    ctx: Ctx, project: ProjectName, principal: Annotated[Principal, require("control")]
) -> dict[str, Any]:
    """Remove the project's policy; its runs without their own are sent `{"enabled": false}`."""
    return _pushed(ctx, await run_in_threadpool(policies.delete_project, ctx.store, project, principal.name))


@router.get("/runs/{run_id}/autopilot", response_model=PolicyOut, dependencies=[require("read")])
async def get_run_policy(ctx: Ctx, run_id: RunId) -> dict[str, Any]:
    """The run's effective policy and where it comes from: its own (`run`), its project's
    (`project`) or `none`."""
    return (await run_in_threadpool(policies.get_run, ctx.store, run_id)).to_json()


@router.put("/runs/{run_id}/autopilot", response_model=PolicyOut)
async def put_run_policy(
    ctx: Ctx, run_id: RunId, body: PolicyBody, principal: Annotated[Principal, require("control")]
) -> dict[str, Any]:
    """Set the run's own policy, in force instead of the project's; sent to the run's agents
    when it changes what they run (a finished run is only stored)."""
    policy = check_policy(body)
    return _pushed(ctx, await run_in_threadpool(policies.put_run, ctx.store, run_id, policy, principal.name))


@router.delete("/runs/{run_id}/autopilot", response_model=PolicyOut)
async def delete_run_policy(
    ctx: Ctx, run_id: RunId, principal: Annotated[Principal, require("control")]
) -> dict[str, Any]:
    """Remove the run's own policy: the project's is in force again and sent to the run (with
    no project policy, `{"enabled": false}` is)."""
    return _pushed(ctx, await run_in_threadpool(policies.delete_run, ctx.store, run_id, principal.name))
