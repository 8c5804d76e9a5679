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
from trimtab.server.store import Store
from trimtab.server.tables import api_tokens

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
