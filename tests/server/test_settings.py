"""Server settings refuse values that would break the protocol's promises."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from trimtab.addresses import is_loopback
from trimtab.protocol import MAX_FRAME_BYTES
from trimtab.server.settings import Settings


def test_frame_limit_cannot_go_below_the_protocol_limit() -> None:
    with pytest.raises(ValidationError):
        Settings(max_frame_bytes=MAX_FRAME_BYTES - 1)
    assert Settings(max_frame_bytes=2 * MAX_FRAME_BYTES).max_frame_bytes == 2 * MAX_FRAME_BYTES


def test_embedded_default_database_and_loopback() -> None:
    settings = Settings(data_dir=Path("/tmp/trimtab-settings-test"))
    assert settings.embedded and settings.database_url == "sqlite:////tmp/trimtab-settings-test/trimtab.db"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")
