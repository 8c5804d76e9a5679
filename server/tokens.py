"""API tokens: random, shown once, stored as SHA-256 hashes with scopes.

Tokens carry 256 bits of randomness, so a fast hash is enough: nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import insert, select, update

from trimtab.errors import ErrorCode, TrimtabError
from trimtab.server.db.store import Store
from trimtab.server.db.tables import api_tokens

SCOPES = ("ingest", "read", "control", "admin")
TOKEN_PREFIX = "tt_"


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


ANONYMOUS_ADMIN = Principal("anonymous (auth disabled)", frozenset(SCOPES))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = scopes - set(SCOPES)
    if unknown or not scopes:
        raise TrimtabError(
            ErrorCode.INVALID_REQUEST, f"scopes must be a comma-separated subset of {', '.join(SCOPES)}; got {text!r}"
        )
    return scopes


def create_token(store: Store, name: str, scopes: frozenset[str]) -> str:
    if not 0 < len(name) <= 128 or "\x00" in name:
        raise TrimtabError(ErrorCode.INVALID_REQUEST, "a token name must be 1-128 characters")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with store.transaction() as conn:
        conn.execute(
            insert(api_tokens),
            {
                "name": name,
                "token_hash": hash_token(token),
                "prefix": token[:10],
                "scopes": ",".join(sorted(scopes)),
                "created_at": time.time(),
            },
        )
    return token


def verify_token(store: Store, token: str) -> Principal | None:
    with store.transaction() as conn:
        row = conn.execute(
            select(api_tokens.c.id, api_tokens.c.name, api_tokens.c.scopes).where(
                api_tokens.c.token_hash == hash_token(token), api_tokens.c.revoked_at.is_(None)
            )
        ).first()
        if row is None:
            return None
        conn.execute(update(api_tokens).where(api_tokens.c.id == row.id).values(last_used_at=time.time()))
    return Principal(row.name, frozenset(row.scopes.split(",")))


def list_tokens(store: Store) -> list[dict[str, object]]:
    with store.transaction() as conn:
        rows = conn.execute(
            select(
                api_tokens.c.id,
                api_tokens.c.name,
                api_tokens.c.prefix,
                api_tokens.c.scopes,
                api_tokens.c.created_at,
                api_tokens.c.last_used_at,
                api_tokens.c.revoked_at,
            ).order_by(api_tokens.c.id)
        ).all()
    return [dict(r._mapping) for r in rows]


def revoke_token(store: Store, token_id: int) -> None:
    """Refuse the token from now on (servers that cached it stop accepting it within their cache time)."""
    with store.transaction() as conn:
        changed = conn.execute(
            update(api_tokens)
            .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
            .values(revoked_at=time.time())
        ).rowcount
    if changed != 1:
        raise TrimtabError(ErrorCode.NOT_FOUND, f"no active token with id {token_id}")
