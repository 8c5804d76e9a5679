"""Autopilot policies set from the server: a project's, and a run's own (in force instead of
the project's), with the ``set_autopilot`` commands that carry a run's policy to its agents.

A run's effective policy is its own, else its project's, else none. When it changes (a PUT
or DELETE on the run or on its project) and when a run is created while its project has a
policy, a ``set_autopilot`` command with the effective policy as args is stored in the same
transaction, exactly as ``POST /commands`` stores one (pending, ``source: human``); the
caller pushes the returned commands to the connected agents. A run left with no policy gets
``{"enabled": false}``.

Every policy write of a project, and the creation of a run, first locks the project's row,
so a run created during a project PUT either is seen by it or reads the new policy itself.

Blocking: call from worker threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from trimtab.errors import ErrorCode, TrimtabError
from trimtab.server.commands import store as commands
from trimtab.server.commands.kinds import AUTOPILOT_ENABLED, DEFAULT_EXPIRES_IN_S, CommandRequest, autopilot_problem
from trimtab.server.commands.store import Command
from trimtab.server.db.store import Store
from trimtab.server.db.tables import autopilot_policies, projects, runs

RUN, PROJECT, NONE = "run", "project", "none"
KIND = "set_autopilot"
OFF: dict[str, Any] = {AUTOPILOT_ENABLED: False}  # what a run left with no policy is sent
CREATED_BY_POLICY = "policy"  # created_by of the command a new run gets


@dataclass(frozen=True)
class Policy:
    """A policy in force (or none), and where it comes from."""

    source: str  # run | project | none
    policy: dict[str, Any] | None
    updated_at: float | None = None
    updated_by: str | None = None

    @property
    def args(self) -> dict[str, Any]:
        """The ``set_autopilot`` args that carry it."""
        return self.policy if self.policy is not None else OFF


@dataclass(frozen=True)
class PolicyView:
    project: str
    run_id: int | None
    policy: Policy
    commands: list[Command] = field(default_factory=list)  # set_autopilot commands a change stored

    def to_json(self) -> dict[str, Any]:
        p = self.policy
        updated = None if p.updated_at is None else datetime.fromtimestamp(p.updated_at, timezone.utc)
        return {
            "project": self.project,
            "run_id": self.run_id,
            "source": p.source,
            "policy": p.policy,
            "updated_at": None if updated is None else updated.isoformat(),
            "updated_by": p.updated_by,
            "commands": [c.to_json() for c in self.commands],
        }


def check_policy(body: Any) -> dict[str, Any]:
    """A PUT body as the policy to store, ``enabled`` first (true when left out)."""
    if not isinstance(body, dict):
        raise TrimtabError(ErrorCode.INVALID_POLICY, 'the body must be a JSON object: {"enabled": true, ...}')
    problem = autopilot_problem(body)
    if problem is not None:
        raise TrimtabError(ErrorCode.INVALID_POLICY, problem)
    options = {name: value for name, value in body.items() if name != AUTOPILOT_ENABLED}
    return {AUTOPILOT_ENABLED: body.get(AUTOPILOT_ENABLED, True), **options}


# ---------------------------------------------------------------- reading


def _stored(conn: Connection, project_id: int, run_id: int | None) -> Policy | None:
    c = autopilot_policies.c
    scope = c.run_id.is_(None) if run_id is None else c.run_id == run_id
    row = conn.execute(select(c.policy, c.updated_at, c.updated_by).where(c.project_id == project_id, scope)).first()
    if row is None:
        return None
    return Policy(RUN if run_id is not None else PROJECT, dict(row.policy), row.updated_at, row.updated_by)


def _effective(conn: Connection, project_id: int, run_id: int | None) -> Policy:
    own = _stored(conn, project_id, run_id) if run_id is not None else None
    return own or _stored(conn, project_id, None) or Policy(NONE, None)


def _run(conn: Connection, run_id: int) -> tuple[int, str, str]:
    """(project id, project name, status) of a run; ``run_not_found`` when there is none."""
    row = conn.execute(
        select(runs.c.project_id, projects.c.name, runs.c.status)
        .join(projects, projects.c.id == runs.c.project_id)
        .where(runs.c.id == run_id)
    ).first()
    if row is None:
        raise TrimtabError(ErrorCode.RUN_NOT_FOUND, f"no run with id {run_id}")
    return int(row.project_id), str(row.name), str(row.status)


def _project_id(conn: Connection, project: str) -> int | None:
    found = conn.execute(select(projects.c.id).where(projects.c.name == project)).scalar()
    return None if found is None else int(found)


def get_project(store: Store, project: str) -> PolicyView:
    """The project's policy; none for a project without one (or with no runs yet)."""
    with store.transaction() as conn:
        project_id = _project_id(conn, project)
        policy = _stored(conn, project_id, None) if project_id is not None else None
        return PolicyView(project, None, policy or Policy(NONE, None))


def get_run(store: Store, run_id: int) -> PolicyView:
    """The run's effective policy: its own, else its project's, else none."""
    with store.transaction() as conn:
        project_id, project, _ = _run(conn, run_id)
        return PolicyView(project, run_id, _effective(conn, project_id, run_id))


# ---------------------------------------------------------------- writing


def _lock_project(store: Store, conn: Connection, project: str, create: bool) -> int | None:
    """The project's id with its row locked for this transaction (created when ``create``)."""
    if store.sqlite:
        # A write first takes SQLite's write lock (waiting for it), so every read after it
        # sees every committed write; on SQLite a lock on the database is the row lock.
        conn.execute(update(projects).where(projects.c.name == project).values(name=projects.c.name))
    if create:
        project_id, _ = store.get_or_create(
            conn, projects, {"name": project}, {"created_at": time.time()}, conflict=["name"]
        )
    else:
        found = _project_id(conn, project)
        if found is None:
            return None
        project_id = found
    if not store.sqlite:
        conn.execute(select(projects.c.id).where(projects.c.id == project_id).with_for_update())
    return project_id


def _lock_run(store: Store, conn: Connection, run_id: int) -> tuple[int, str, str]:
    _, project, _ = _run(conn, run_id)
    _lock_project(store, conn, project, create=False)
    return _run(conn, run_id)  # read again under the lock


def _upsert(conn: Connection, project_id: int, run_id: int | None, policy: dict[str, Any], by: str) -> Policy:
    """Store the policy (the project's row lock keeps this select-then-write safe)."""
    c = autopilot_policies.c
    now, by = time.time(), by[:128]
    scope = c.run_id.is_(None) if run_id is None else c.run_id == run_id
    found = conn.execute(select(c.id).where(c.project_id == project_id, scope)).scalar()
    values = {"policy": policy, "updated_at": now, "updated_by": by}
    if found is None:
        conn.execute(insert(autopilot_policies).values(project_id=project_id, run_id=run_id, **values))
    else:
        conn.execute(update(autopilot_policies).where(c.id == found).values(**values))
    return Policy(RUN if run_id is not None else PROJECT, policy, now, by)


def _remove(conn: Connection, project_id: int, run_id: int | None, where: str) -> None:
    c = autopilot_policies.c
    scope = c.run_id.is_(None) if run_id is None else c.run_id == run_id
    if _stored(conn, project_id, run_id) is None:
        raise TrimtabError(ErrorCode.POLICY_NOT_FOUND, f"{where} has no autopilot policy of its own")
    conn.execute(delete(autopilot_policies).where(c.project_id == project_id, scope))


def _send(store: Store, conn: Connection, run_id: int, policy: Policy, by: str) -> Command:
    request = CommandRequest(kind=KIND, args=policy.args, id=None, expires_in_s=DEFAULT_EXPIRES_IN_S)
    command, _ = commands.create_in(store, conn, run_id, request, by)
    return command


def _following_project(conn: Connection, project_id: int) -> list[int]:
    """The project's runs still going (not finished) that have no policy of their own."""
    own = select(autopilot_policies.c.run_id).where(autopilot_policies.c.run_id.is_not(None))
    query = (
        select(runs.c.id)
        .where(runs.c.project_id == project_id, runs.c.status != "finished", runs.c.id.not_in(own))
        .order_by(runs.c.id)
    )
    return [int(r) for r in conn.execute(query).scalars()]


def put_project(store: Store, project: str, policy: dict[str, Any], by: str) -> PolicyView:
    """Set the project's policy (creating the project) and send it to its runs that follow it."""
    with store.transaction() as conn:
        project_id = _lock_project(store, conn, project, create=True)
        assert project_id is not None
        before = _stored(conn, project_id, None) or Policy(NONE, None)
        after = _upsert(conn, project_id, None, policy, by)
        sent = _send_to_followers(store, conn, project_id, before, after, by)
        return PolicyView(project, None, after, sent)


def delete_project(store: Store, project: str, by: str) -> PolicyView:
    """Remove the project's policy: its runs without their own get ``{"enabled": false}``."""
    with store.transaction() as conn:
        project_id = _lock_project(store, conn, project, create=False)
        if project_id is None:
            raise TrimtabError(ErrorCode.POLICY_NOT_FOUND, f"project {project!r} has no autopilot policy")
        before = _stored(conn, project_id, None) or Policy(NONE, None)
        _remove(conn, project_id, None, f"project {project!r}")
        after = Policy(NONE, None)
        sent = _send_to_followers(store, conn, project_id, before, after, by)
        return PolicyView(project, None, after, sent)


def _send_to_followers(
    store: Store, conn: Connection, project_id: int, before: Policy, after: Policy, by: str
) -> list[Command]:
    if before.args == after.args:
        return []
    return [_send(store, conn, run_id, after, by) for run_id in _following_project(conn, project_id)]


def put_run(store: Store, run_id: int, policy: dict[str, Any], by: str) -> PolicyView:
    """Set the run's own policy and send it to the run when that changes what it runs."""
    with store.transaction() as conn:
        project_id, project, status = _lock_run(store, conn, run_id)
        before = _effective(conn, project_id, run_id)
        after = _upsert(conn, project_id, run_id, policy, by)
        return PolicyView(project, run_id, after, _send_if_changed(store, conn, run_id, status, before, after, by))


def delete_run(store: Store, run_id: int, by: str) -> PolicyView:
    """Remove the run's own policy: the project's is in force again (or none: autopilot off)."""
    with store.transaction() as conn:
        project_id, project, status = _lock_run(store, conn, run_id)
        before = _effective(conn, project_id, run_id)
        _remove(conn, project_id, run_id, f"run {run_id}")
        after = _effective(conn, project_id, run_id)
        return PolicyView(project, run_id, after, _send_if_changed(store, conn, run_id, status, before, after, by))


def _send_if_changed(
    store: Store, conn: Connection, run_id: int, status: str, before: Policy, after: Policy, by: str
) -> list[Command]:
    if before.args == after.args or status == "finished":  # a finished run has no loop to steer
        return []
    return [_send(store, conn, run_id, after, by)]


def run_created(store: Store, conn: Connection, run_id: int, project_id: int) -> None:
    """``Store.open_run``'s hook: a new run of a project with a policy is sent it. Its agent
    gets the command as an open command right after ``welcome``."""
    if not store.sqlite:  # on SQLite the run's INSERT already holds the write lock
        conn.execute(select(projects.c.id).where(projects.c.id == project_id).with_for_update())
    policy = _stored(conn, project_id, None)
    if policy is not None:
        _send(store, conn, run_id, policy, CREATED_BY_POLICY)
