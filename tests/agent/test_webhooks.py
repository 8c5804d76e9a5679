"""``trimtab.webhooks``: what a receiver uses to check a trimtab webhook."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from trimtab.webhooks import WebhookVerificationError, check, sign, verify

SECRET = "whsec_0123456789abcdef"
BODY = b'{"event":"firing","delivery_id":7,"alert":{"value":"NaN"}}'
NOW = 1_700_000_000


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, NOW, BODY) == "sha256=" + expected
    assert sign(SECRET.encode(), str(NOW), BODY) == "sha256=" + expected


def test_a_genuine_request_verifies() -> None:
    signature = sign(SECRET, NOW, BODY)
    assert verify(SECRET, str(NOW), signature, BODY, now=NOW + 299)
    assert verify(SECRET, NOW, signature, BODY, now=NOW - 299)  # a receiver clock a little behind


@pytest.mark.parametrize(
    ("secret", "timestamp", "signature", "body", "reason"),
    [
        ("whsec_another_secret__", NOW, None, BODY, "signature mismatch"),
        (SECRET, NOW, None, BODY + b" ", "signature mismatch"),
        (SECRET, NOW + 1, None, BODY, "signature mismatch"),  # the timestamp is signed too
        (SECRET, NOW, "sha1=abc", BODY, "must start with 'sha256='"),
        (SECRET, "yesterday", None, BODY, "not an integer"),
        (SECRET, None, None, BODY, "missing"),
        ("", NOW, None, BODY, "no secret"),
    ],
)
def test_forgeries_are_rejected_with_a_reason(
    secret: str, timestamp: int | str | None, signature: str | None, body: bytes, reason: str
) -> None:
    if signature is None and timestamp is not None:
        signature = sign(SECRET, NOW, BODY)  # genuine for the original request
    with pytest.raises(WebhookVerificationError, match=reason):
        check(secret, timestamp, signature, body, now=NOW)
    assert not verify(secret, timestamp, signature, body, now=NOW)


def test_a_replay_outside_the_tolerance_is_rejected() -> None:
    signature = sign(SECRET, NOW, BODY)
    with pytest.raises(WebhookVerificationError, match="stale or replayed"):
        check(SECRET, NOW, signature, BODY, now=NOW + 301)
    assert not verify(SECRET, NOW, signature, BODY, now=NOW + 301)
    assert verify(SECRET, NOW, signature, BODY, tolerance_s=3600, now=NOW + 301)


def test_an_absurd_timestamp_is_rejected_not_raised() -> None:
    huge = "9" * 400
    assert not verify(SECRET, huge, sign(SECRET, huge, BODY), BODY)
    with pytest.raises(WebhookVerificationError, match="not a unix time"):
        check(SECRET, huge, "sha256=00", BODY)
