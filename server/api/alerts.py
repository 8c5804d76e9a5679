"""REST for alert rules (per project, per-run overrides) and alerts. Reads need ``read``,
rule writes need ``admin``. Rule bodies are validated by ``trimtab.detectors.parse_rule``:
a bad one is ``invalid_rule`` (422) naming the field and the reason."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from trimtab.detectors import CRITICAL, INFO, WARNING
from trimtab.protocol import INT32_MAX, INT64_MAX
from trimtab.server.alerts import store as alert_store
from trimtab.server.alerts.rules import RuleStore, Scope, SourcedRule, check_body
from trimtab.server.alerts.store import FIRING, RESOLVED, AlertFilter
from trimtab.server.api.deps import ERRORS, Ctx, ErrorResponse, NoNul, RunId, require
from trimtab.server.context import ServerContext

router = APIRouter(prefix="/api/v1", responses={**ERRORS, 409: {"model": ErrorResponse}}, tags=["alerts"])

ProjectName = Annotated[
    str, Path(min_length=1, max_length=128, pattern=NoNul, description="the project's name (as runs report it)")
]
RuleName = Annotated[str, Path(min_length=1, max_length=128, pattern=NoNul)]
RuleBody = Annotated[
    dict[str, Any],
    Body(
        description="a rule: name, key (exact or a glob such as act/*/zero_frac), detector, params, severity, "
        "confirm, cooldown_s, resolve_after_steps, enabled, remedy (docs/alerts.md)",
        examples=[
            {
                "name": "attn-logits",
                "key": "attn/max_logit",
                "detector": "threshold",
                "params": {"op": ">", "limit": 1000.0},
            }
        ],
    ),
]


class ConfirmOut(BaseModel):
    key: str
    detector: str
    params: dict[str, Any]
    window: int


class RuleOut(BaseModel):
    name: str
    key: str
    detector: str
    params: dict[str, Any]
    severity: str | None  # null: the detector's own
    confirm: ConfirmOut | None
    cooldown_s: float
    resolve_after_steps: int
    enabled: bool
    remedy: str
    source: str  # default | project | run: where the rule in force comes from


class AlertOut(BaseModel):
    id: int
    project: str
    run_id: int
    run_name: str | None
    run_uid: str
    rank: int
    rule: str
    key: str
    detector: str
    severity: str  # info (an annotation, never notified) | warning | critical
    status: str  # firing | resolved
    message: str
    remedy: str
    value: float | str  # "NaN" / "Infinity" / "-Infinity" when not finite
    baseline: float | str | None
    first_step: int
    last_step: int
    count: int  # findings folded into the alert
    fired_at: str
    updated_at: str
    resolved_at: str | None
    resolve_reason: str | None  # quiet | run_finished | rule_removed
    notified: bool  # false: opened within its rule's cooldown, nothing was sent
    data: dict[str, Any]
    url: str  # the run's page


def rules_store(ctx: ServerContext) -> RuleStore:
    return RuleStore(ctx.store)


def _changed(ctx: ServerContext, scope: Scope) -> None:
    if ctx.alerts is not None:
        ctx.alerts.rules_changed(scope.project_id)


def _out(rule: SourcedRule) -> dict[str, Any]:
    return rule.to_dict()


# ---------------------------------------------------------------- project rules


@router.get("/projects/{project}/rules", response_model=list[RuleOut], dependencies=[require("read")])
async def list_project_rules(ctx: Ctx, project: ProjectName) -> list[dict[str, Any]]:
    """The rules in force for the project's runs: the shipped defaults, replaced by name by the
    project's own (`source` says which). A project with no runs yet shows the defaults."""
    return [_out(r) for r in await run_in_threadpool(rules_store(ctx).in_force, project, None)]


@router.get("/projects/{project}/rules/{name}", response_model=RuleOut, dependencies=[require("read")])
async def get_project_rule(ctx: Ctx, project: ProjectName, name: RuleName) -> dict[str, Any]:
    """The rule `name` in force for the project: its own, else the shipped default (`source` says which)."""
    return _out(await run_in_threadpool(rules_store(ctx).get, project, None, name))


@router.post("/projects/{project}/rules", response_model=RuleOut, status_code=201, dependencies=[require("admin")])
async def create_project_rule(ctx: Ctx, project: ProjectName, body: RuleBody) -> dict[str, Any]:
    """Add a rule to the project (created if it has no runs yet). A name of a shipped default
    overrides it; a name the project already has is `rule_exists` (409): PUT replaces."""
    return await _write(ctx, project, None, body, None, replace=False)


@router.put("/projects/{project}/rules/{name}", response_model=RuleOut, dependencies=[require("admin")])
async def put_project_rule(ctx: Ctx, project: ProjectName, name: RuleName, body: RuleBody) -> dict[str, Any]:
    """Create or replace the project's rule `name` (`enabled: false` switches a default off)."""
    return await _write(ctx, project, None, body, name, replace=True)


@router.delete("/projects/{project}/rules/{name}", status_code=204, dependencies=[require("admin")])
async def delete_project_rule(ctx: Ctx, project: ProjectName, name: RuleName) -> Response:
    """Delete the project's own rule; a default of that name is in force again."""
    scope = await run_in_threadpool(rules_store(ctx).delete, project, None, name)
    _changed(ctx, scope)
    return Response(status_code=204)


# ---------------------------------------------------------------- per-run overrides


@router.get("/runs/{run_id}/rules", response_model=list[RuleOut], dependencies=[require("read")])
async def list_run_rules(ctx: Ctx, run_id: RunId) -> list[dict[str, Any]]:
    """The rules in force for this run: defaults, then the project's, then the run's own."""
    return [_out(r) for r in await run_in_threadpool(rules_store(ctx).in_force, None, run_id)]


@router.get("/runs/{run_id}/rules/{name}", response_model=RuleOut, dependencies=[require("read")])
async def get_run_rule(ctx: Ctx, run_id: RunId, name: RuleName) -> dict[str, Any]:
    """The rule `name` in force for this run: its own, else the project's, else the default."""
    return _out(await run_in_threadpool(rules_store(ctx).get, None, run_id, name))


@router.post("/runs/{run_id}/rules", response_model=RuleOut, status_code=201, dependencies=[require("admin")])
async def create_run_rule(ctx: Ctx, run_id: RunId, body: RuleBody) -> dict[str, Any]:
    """Add a rule to this run only. A name in force from the project or the defaults overrides
    it for this run; a name the run already has is `rule_exists` (409): PUT replaces."""
    return await _write(ctx, None, run_id, body, None, replace=False)


@router.put("/runs/{run_id}/rules/{name}", response_model=RuleOut, dependencies=[require("admin")])
async def put_run_rule(ctx: Ctx, run_id: RunId, name: RuleName, body: RuleBody) -> dict[str, Any]:
    """Create or replace this run's rule `name` (`enabled: false` switches an inherited rule off for it)."""
    return await _write(ctx, None, run_id, body, name, replace=True)


@router.delete("/runs/{run_id}/rules/{name}", status_code=204, dependencies=[require("admin")])
async def delete_run_rule(ctx: Ctx, run_id: RunId, name: RuleName) -> Response:
    """Delete the run's own rule; the project's or the default of that name is in force again."""
    scope = await run_in_threadpool(rules_store(ctx).delete, None, run_id, name)
    _changed(ctx, scope)
    return Response(status_code=204)


async def _write(
    ctx: ServerContext, project: str | None, run_id: int | None, body: dict[str, Any], name: str | None, replace: bool
) -> dict[str, Any]:
    spec = check_body(body, name)
    scope, _ = await run_in_threadpool(rules_store(ctx).write, project, run_id, spec, replace)
    _changed(ctx, scope)
    return _out(SourcedRule(spec, "run" if run_id is not None else "project"))


# ---------------------------------------------------------------- alerts

Status = Annotated[str | None, Query(pattern=f"^({FIRING}|{RESOLVED})$")]
Severity = Annotated[str | None, Query(pattern=f"^({INFO}|{WARNING}|{CRITICAL})$")]
AfterId = Annotated[int | None, Query(ge=0, le=INT64_MAX, description="only alerts with a larger id")]
BeforeId = Annotated[int | None, Query(ge=1, le=INT64_MAX, description="only alerts with a smaller id")]
Order = Annotated[str, Query(pattern="^(newest|oldest)$", description="newest (default) or oldest first, by id")]
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.get("/alerts", response_model=list[AlertOut], dependencies=[require("read")])
async def list_alerts(
    ctx: Ctx,
    status: Status = None,
    severity: Severity = None,
    project: Annotated[str | None, Query(min_length=1, max_length=128, pattern=NoNul)] = None,
    after_id: AfterId = None,
    before_id: BeforeId = None,
    order: Order = "newest",
    limit: Limit = 100,
) -> list[dict[str, Any]]:
    """Alerts matching every filter, newest first, at most `limit`. Page back with
    `before_id` (the last id received); poll for new ones with `order=oldest&after_id=`."""
    f = AlertFilter(
        status=status,
        severity=severity,
        project=project,
        after_id=after_id,
        before_id=before_id,
        oldest_first=order == "oldest",
        limit=limit,
    )
    return await run_in_threadpool(_list, ctx, f)


@router.get("/alerts/{alert_id}", response_model=AlertOut, dependencies=[require("read")])
async def get_alert(ctx: Ctx, alert_id: Annotated[int, Path(ge=1, le=INT64_MAX)]) -> dict[str, Any]:
    """One alert: its rule, key, severity, status, first and last step and value, remedy and links."""

    def read() -> dict[str, Any]:
        with ctx.store.transaction() as conn:
            return alert_store.get_alert(conn, alert_id, ctx.settings.base_url)

    return await run_in_threadpool(read)


@router.get("/runs/{run_id}/alerts", response_model=list[AlertOut], dependencies=[require("read")])
async def list_run_alerts(
    ctx: Ctx,
    run_id: RunId,
    status: Status = None,
    severity: Severity = None,
    rank: Annotated[int | None, Query(ge=0, le=INT32_MAX)] = None,
    after_id: AfterId = None,
    before_id: BeforeId = None,
    order: Order = "newest",
    limit: Limit = 100,
) -> list[dict[str, Any]]:
    """The run's alerts (404 for an unknown run), filtered and ordered like `GET /alerts`."""
    f = AlertFilter(
        status=status,
        severity=severity,
        run_id=run_id,
        rank=rank,
        after_id=after_id,
        before_id=before_id,
        oldest_first=order == "oldest",
        limit=limit,
    )

    def read() -> list[dict[str, Any]]:
        ctx.store.get_run(run_id)  # run_not_found
        return _list(ctx, f)

    return await run_in_threadpool(read)


def _list(ctx: ServerContext, f: AlertFilter) -> list[dict[str, Any]]:
    with ctx.store.transaction() as conn:
        return alert_store.list_alerts(conn, f, ctx.settings.base_url)
