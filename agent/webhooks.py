"""Sign and verify trimtab webhook requests (standard library only).

A trimtab server signs every webhook it sends with the sink's secret::

    X-Trimtab-Timestamp: 1700000000
    X-Trimtab-Signature: sha256=<hex HMAC-SHA256(secret, b"1700000000." + body)>

A receiver checks both before trusting the body::

    from trimtab.webhooks import verify

    ok = verify(secret, request.headers["X-Trimtab-Timestamp"],
                request.headers["X-Trimtab-Signature"], raw_body)

Use the raw request bytes, not re-serialised JSON. ``verify`` rejects a timestamp more than
``tolerance_s`` away from now, so a captured request cannot be replayed later; to reject a
replay inside that window too, remember the ``X-Trimtab-Delivery`` ids you have handled.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Trimtab-Signature"
TIMESTAMP_HEADER = "X-Trimtab-Timestamp"
DELIVERY_HEADER = "X-Trimtab-Delivery"
SCHEME = "sha256="
DEFAULT_TOLERANCE_S = 300.0


class WebhookVerificationError(ValueError):
    """The request is not a genuine, fresh trimtab webhook; ``str()`` says why."""


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The ``X-Trimtab-Signature`` value for ``body`` sent at unix second ``timestamp``."""
    mac = hmac.new(_key(secret), f"{timestamp}.".encode() + body, hashlib.sha256)
    return SCHEME + mac.hexdigest()


def check(
    secret: str | bytes,
    timestamp: int | str | None,
    signature: str | None,
    body: bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Raise :class:`WebhookVerificationError` unless the signature matches and the timestamp
    is within ``tolerance_s`` seconds of ``now`` (default: the current time)."""
    if not secret:
        raise WebhookVerificationError("no secret configured")
    if timestamp is None or signature is None:
        raise WebhookVerificationError(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
    text = str(timestamp).strip()
    if len(text) > 12:  # unix seconds have 10 digits; a huge one would overflow the float maths below
        raise WebhookVerificationError(f"{TIMESTAMP_HEADER} is not a unix time: {text[:20]!r}...")
    try:
        sent_at = int(text)
    except ValueError:
        raise WebhookVerificationError(f"{TIMESTAMP_HEADER} is not an integer: {timestamp!r}") from None
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance_s:
        raise WebhookVerificationError(
            f"{TIMESTAMP_HEADER} is {current - sent_at:.0f} s from now (tolerance {tolerance_s:g} s): stale or replayed"
        )
    if not signature.startswith(SCHEME):
        raise WebhookVerificationError(f"{SIGNATURE_HEADER} must start with {SCHEME!r}")
    expected = sign(secret, sent_at, body)
    # Compare the whole header in constant time; the timestamp is signed as the receiver parsed it.
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        raise WebhookVerificationError("signature mismatch: wrong secret, or the body was altered")


def verify(
    secret: str | bytes,
    timestamp: int | str | None,
    signature: str | None,
    body: bytes,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True when ``body`` was signed with ``secret`` at a timestamp within ``tolerance_s`` of now."""
    try:
        check(secret, timestamp, signature, body, tolerance_s, now)
    except WebhookVerificationError:
        return False
    return True
