"""Bearer-token authentication for REST and the agent socket, with a short verification cache."""

from __future__ import annotations

import threading
import time

from trimtab.errors import ErrorCode, TrimtabError
from trimtab.server.db.store import Store
from trimtab.server.tokens import ANONYMOUS_ADMIN, Principal, verify_token


class Authenticator:
    def __init__(self, store: Store, enabled: bool, cache_s: float) -> None:
        self.store = store
        self.enabled = enabled
        self.cache_s = cache_s
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def authenticate(self, authorization: str | None, scope: str) -> Principal:
        """Blocking (may query the database): call from a worker thread."""
        if not self.enabled:
            return ANONYMOUS_ADMIN
        token = _bearer(authorization)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(token)
        if cached is not None and cached[1] > now:
            principal = cached[0]
        else:
            found = verify_token(self.store, token)
            if found is None:
                raise TrimtabError(ErrorCode.UNAUTHORIZED, "the token is unknown or revoked")
            principal = found
            with self._lock:
                self._cache[token] = (principal, now + self.cache_s)
        if not principal.allows(scope):
            raise TrimtabError(
                ErrorCode.FORBIDDEN,
                f"token {principal.name!r} lacks the {scope!r} scope (it has {', '.join(sorted(principal.scopes))})",
            )
        return principal


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise TrimtabError(ErrorCode.UNAUTHORIZED, "missing 'Authorization: Bearer <token>' header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TrimtabError(ErrorCode.UNAUTHORIZED, "the Authorization header must be 'Bearer <token>'")
    return token.strip()
