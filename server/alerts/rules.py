"""Alert rules: the shipped defaults, a project's rules and a run's overrides, stored and merged.

The effective rules of a run are the defaults, replaced by name by the project's rules,
replaced by name by the run's own; a rule with ``enabled: false`` switches that name off.
Stored bodies are ``RuleSpec.to_dict()`` and are parsed again when read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from trimtab.detectors import DEFAULT_RULES, RuleError, RuleSpec, parse_rule
from trimtab.errors import ErrorCode, TrimtabError
from trimtab.server.db.store import Store
from trimtab.server.db.tables import alert_rules, projects, runs

logger = logging.getLogger("trimtab.server")

DEFAULT, PROJECT, RUN = "default", "project", "run"


@dataclass(frozen=True)
class SourcedRule:
    spec: RuleSpec
    source: str  # default | project | run

    def to_dict(self) -> dict[str, Any]:
        return {**self.spec.to_dict(), "source": self.source}


def merge(project_rules: list[RuleSpec], run_rules: list[RuleSpec]) -> list[SourcedRule]:
    """Every rule name once, from the most specific source, disabled ones included, by name."""
    merged: dict[str, SourcedRule] = {spec.name: SourcedRule(spec, DEFAULT) for spec in DEFAULT_RULES}
    for spec in project_rules:
        merged[spec.name] = SourcedRule(spec, PROJECT)
    for spec in run_rules:
        merged[spec.name] = SourcedRule(spec, RUN)
    return [merged[name] for name in sorted(merged)]


def _parse_stored(body: Any, where: str) -> RuleSpec | None:
    try:
        return parse_rule(body)
    except RuleError as exc:  # stored under an older rule format: left out, not fatal
        logger.warning("alert rule %s no longer parses and is ignored: %s", where, exc)
        return None


def stored_rules(conn: Connection, project_id: int, run_id: int | None) -> list[RuleSpec]:
    """The project's rules (``run_id`` None) or the run's overrides, as specs."""
    cond = alert_rules.c.run_id.is_(None) if run_id is None else alert_rules.c.run_id == run_id
    rows = conn.execute(
        select(alert_rules.c.name, alert_rules.c.body)
        .where(alert_rules.c.project_id == project_id, cond)
        .order_by(alert_rules.c.name)
    ).all()
    specs = (_parse_stored(r.body, f"{r.name!r} of project {project_id}") for r in rows)
    return [s for s in specs if s is not None]


def effective(conn: Connection, project_id: int | None, run_id: int | None) -> list[SourcedRule]:
    project_rules = stored_rules(conn, project_id, None) if project_id is not None else []
    run_rules = stored_rules(conn, project_id, run_id) if project_id is not None and run_id is not None else []
    return merge(project_rules, run_rules)


def check_body(body: Mapping[str, Any], name: str | None = None) -> RuleSpec:
    """Parse a rule body from a client; ``name`` (from the path) fills or must equal ``body.name``."""
    if name is not None:
        if "name" in body and body["name"] != name:
            raise TrimtabError(ErrorCode.INVALID_RULE, f"name: {body['name']!r} differs from the path's {name!r}")
        body = {**body, "name": name}
    where = _nul_in(body)
    if where is not None:  # PostgreSQL text cannot hold NUL, and no rule needs one
        raise TrimtabError(ErrorCode.INVALID_RULE, f"{where}: NUL characters are not allowed")
    try:
        return parse_rule(body)
    except RuleError as exc:
        raise TrimtabError(ErrorCode.INVALID_RULE, str(exc)) from None


def _nul_in(value: Any, where: str = "rule") -> str | None:
    """The path of the first string (key or value) holding a NUL character, if any."""
    if isinstance(value, str):
        return where if "\x00" in value else None
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = _nul_in(k, where) or _nul_in(v, f"{k}" if where == "rule" else f"{where}.{k}")
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _nul_in(v, f"{where}[{i}]")
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class Scope:
    """Where rules are written: a project's (run_id None) or one run's."""

    project_id: int
    run_id: int | None

    @property
    def label(self) -> str:
        return f"run {self.run_id}" if self.run_id is not None else "the project"


class RuleStore:
    """The rules' SQL. Blocking: call from a worker thread."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def project_scope(self, conn: Connection, project: str, create: bool) -> Scope | None:
        """The project's scope; a project that does not exist is created when ``create``
        (rules may be set up before the first run), else None."""
        if create:
            project_id, _ = self.store.get_or_create(
                conn, projects, {"name": project}, {"created_at": time.time()}, conflict=["name"]
            )
            return Scope(project_id, None)
        found = conn.execute(select(projects.c.id).where(projects.c.name == project)).scalar()
        return None if found is None else Scope(int(found), None)

    @staticmethod
    def run_scope(conn: Connection, run_id: int) -> Scope:
        project_id = conn.execute(select(runs.c.project_id).where(runs.c.id == run_id)).scalar()
        if project_id is None:
            raise TrimtabError(ErrorCode.RUN_NOT_FOUND, f"no run with id {run_id}")
        return Scope(int(project_id), run_id)

    def _scope(self, conn: Connection, project: str | None, run_id: int | None, create: bool) -> Scope | None:
        if run_id is not None:
            return self.run_scope(conn, run_id)
        assert project is not None
        return self.project_scope(conn, project, create)

    def in_force(self, project: str | None, run_id: int | None) -> list[SourcedRule]:
        """The effective rules of a project (defaults for one that does not exist yet) or a run."""
        with self.store.transaction() as conn:
            scope = self._scope(conn, project, run_id, create=False)
            if scope is None:
                return merge([], [])
            return effective(conn, scope.project_id, scope.run_id)

    def get(self, project: str | None, run_id: int | None, name: str) -> SourcedRule:
        for rule in self.in_force(project, run_id):
            if rule.spec.name == name:
                return rule
        raise TrimtabError(ErrorCode.RULE_NOT_FOUND, f"no rule named {name!r}")

    def write(self, project: str | None, run_id: int | None, spec: RuleSpec, replace: bool) -> tuple[Scope, bool]:
        """Store ``spec`` at the scope. Returns (scope, created). Without ``replace``, a rule of
        that name already stored at this scope is RULE_EXISTS."""
        try:
            return self._write(project, run_id, spec, replace)
        except IntegrityError:  # the same name written at the same moment by another request
            if not replace:
                raise TrimtabError(ErrorCode.RULE_EXISTS, f"a rule named {spec.name!r} was just created") from None
            return self._write(project, run_id, spec, replace)  # it exists now: replace it

    def _write(self, project: str | None, run_id: int | None, spec: RuleSpec, replace: bool) -> tuple[Scope, bool]:
        now = time.time()
        body = spec.to_dict()
        with self.store.transaction() as conn:
            scope = self._scope(conn, project, run_id, create=True)
            assert scope is not None
            where = self._where(scope, spec.name)
            found = conn.execute(select(alert_rules.c.id).where(*where)).scalar()
            if found is not None:
                if not replace:
                    raise TrimtabError(
                        ErrorCode.RULE_EXISTS,
                        f"{scope.label} already has a rule named {spec.name!r}; PUT it to replace it",
                    )
                conn.execute(update(alert_rules).where(alert_rules.c.id == found).values(body=body, updated_at=now))
                return scope, False
            conn.execute(
                insert(alert_rules).values(
                    project_id=scope.project_id,
                    run_id=scope.run_id,
                    name=spec.name,
                    body=body,
                    created_at=now,
                    updated_at=now,
                )
            )
            return scope, True

    def delete(self, project: str | None, run_id: int | None, name: str) -> Scope:
        with self.store.transaction() as conn:
            scope = self._scope(conn, project, run_id, create=False)
            deleted = (
                0 if scope is None else conn.execute(delete(alert_rules).where(*self._where(scope, name))).rowcount
            )
        if scope is None or deleted == 0:
            hint = (
                "; a shipped default cannot be deleted, PUT it with enabled: false to switch it off"
                if any(spec.name == name for spec in DEFAULT_RULES)
                else ""
            )
            where = "the project" if run_id is None else f"run {run_id}"
            raise TrimtabError(ErrorCode.RULE_NOT_FOUND, f"{where} has no rule of its own named {name!r}{hint}")
        return scope

    @staticmethod
    def _where(scope: Scope, name: str) -> list[Any]:
        if scope.run_id is None:
            return [
                alert_rules.c.project_id == scope.project_id,
                alert_rules.c.run_id.is_(None),
                alert_rules.c.name == name,
            ]
        return [alert_rules.c.run_id == scope.run_id, alert_rules.c.name == name]
