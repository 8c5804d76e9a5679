"""Alert sinks in the database: create, list, read, delete, with their delivery counts.

Secrets and URL paths never leave this module in a listing: :func:`masked_url` hides them,
and only :meth:`SinkStore.target` (for sending) reads them back.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import Connection, delete, func, insert, select

from trimtab.errors import ErrorCode, TrimtabError
from trimtab.server.db.store import Store
from trimtab.server.db.tables import alert_deliveries, projects, sinks

KINDS = ("slack", "webhook")
SECRET_PREFIX = "whsec_"
MIN_SECRET_CHARS = 16
MASK = "***"
NAME_LIMIT = 128  # sinks.name is String(128)


@dataclass(frozen=True)
class SinkTarget:
    """What sending needs, secret included."""

    id: int
    kind: str
    url: str
    secret: str | None


def check_url(url: str) -> str:
    """An absolute http(s) URL with a host, or ValueError saying what is wrong."""
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise ValueError("the URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"the URL must be http:// or https://, not {parts.scheme + '://' if parts.scheme else url!r}")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if port == 0:
        raise ValueError("the URL's port must be 1-65535")
    try:
        httpx.URL(url)  # what the sender will parse: an IDNA host it cannot encode, say
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    return url


def masked_url(url: str) -> str:
    """Scheme, host and port only: credentials show as ``***@`` and any path or query as
    ``/***`` (a Slack URL's path is its secret, and a webhook's path or query often holds a
    token too)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    if parts.username or parts.password:
        netloc = f"{MASK}@{netloc}"
    path = "/" + MASK if parts.path not in ("", "/") or parts.query else parts.path
    return urlunsplit((parts.scheme, netloc, path, "", ""))


def default_name(kind: str, url: str) -> str:
    """``"<kind> <host>"``, cut to fit ``sinks.name``."""
    return f"{kind} {urlsplit(url).hostname}"[:NAME_LIMIT]


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


class SinkStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    def create(
        self, kind: str, url: str, secret: str | None, project: str | None, name: str | None, enabled: bool
    ) -> dict[str, Any]:
        if name is not None and len(name) > NAME_LIMIT:
            raise TrimtabError(ErrorCode.INVALID_REQUEST, f"name: at most {NAME_LIMIT} characters")
        now = time.time()
        with self.store.transaction() as conn:
            project_id = None
            if project is not None:
                # A sink may be set up before the project's first run: create the project row.
                project_id, _ = self.store.get_or_create(
                    conn, projects, {"name": project}, {"created_at": now}, conflict=["name"]
                )
            sink_id = conn.execute(
                insert(sinks)
                .values(
                    kind=kind,
                    name=name or default_name(kind, url),
                    url=url,
                    secret=secret,
                    project_id=project_id,
                    enabled=enabled,
                    created_at=now,
                )
                .returning(sinks.c.id)
            ).scalar_one()
            return self._one(conn, int(sink_id))

    def all(self) -> list[dict[str, Any]]:
        with self.store.transaction() as conn:
            rows = conn.execute(self._query().order_by(sinks.c.id)).all()
            return [self._describe(row, self._stats(conn, row.id)) for row in rows]  # sinks are few

    def get(self, sink_id: int) -> dict[str, Any]:
        with self.store.transaction() as conn:
            return self._one(conn, sink_id)

    def delete(self, sink_id: int) -> None:
        """Deletes the sink and, with it, its deliveries (sent or not)."""
        with self.store.transaction() as conn:
            conn.execute(delete(alert_deliveries).where(alert_deliveries.c.sink_id == sink_id))
            if conn.execute(delete(sinks).where(sinks.c.id == sink_id)).rowcount == 0:
                raise _not_found(sink_id)

    def target(self, sink_id: int) -> SinkTarget:
        with self.store.transaction() as conn:
            row = conn.execute(
                select(sinks.c.id, sinks.c.kind, sinks.c.url, sinks.c.secret).where(sinks.c.id == sink_id)
            ).first()
        if row is None:
            raise _not_found(sink_id)
        return SinkTarget(id=row.id, kind=row.kind, url=row.url, secret=row.secret)

    # ------------------------------------------------------------------ reads
    @staticmethod
    def _query() -> Any:
        return select(
            sinks.c.id,
            sinks.c.kind,
            sinks.c.name,
            sinks.c.url,
            sinks.c.secret.is_not(None).label("has_secret"),
            projects.c.name.label("project"),
            sinks.c.enabled,
            sinks.c.created_at,
        ).outerjoin(projects, projects.c.id == sinks.c.project_id)

    def _one(self, conn: Connection, sink_id: int) -> dict[str, Any]:
        row = conn.execute(self._query().where(sinks.c.id == sink_id)).first()
        if row is None:
            raise _not_found(sink_id)
        return self._describe(row, self._stats(conn, sink_id))

    @staticmethod
    def _stats(conn: Connection, sink_id: int) -> dict[str, Any]:
        counts: dict[str, int] = dict(
            conn.execute(
                select(alert_deliveries.c.status, func.count())
                .where(alert_deliveries.c.sink_id == sink_id)
                .group_by(alert_deliveries.c.status)
            ).all()
        )
        last_error = conn.execute(
            select(alert_deliveries.c.last_error)
            .where(alert_deliveries.c.sink_id == sink_id, alert_deliveries.c.last_error.is_not(None))
            .order_by(alert_deliveries.c.id.desc())
            .limit(1)
        ).scalar()
        return {
            "deliveries": {s: int(counts.get(s, 0)) for s in ("pending", "delivered", "dead")},
            "last_error": last_error,
        }

    @staticmethod
    def _describe(row: Any, stats: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": row.id,
            "kind": row.kind,
            "name": row.name,
            "url": masked_url(row.url),
            "has_secret": bool(row.has_secret),
            "project": row.project,
            "enabled": bool(row.enabled),
            "created_at": row.created_at,
            **stats,
        }


def _not_found(sink_id: int) -> TrimtabError:
    return TrimtabError(ErrorCode.NOT_FOUND, f"there is no sink {sink_id}")
