"""Errors the agent swallows so training never sees them: logged and counted here.

Tests assert the count stays at zero, so a swallowed bug still fails the suite.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("trimtab")

_lock = threading.Lock()
_count = 0


def report(where: str, exc: BaseException) -> None:
    global _count
    with _lock:
        _count += 1
    logger.error("trimtab internal error in %s (training continues)", where, exc_info=exc)


def error_count() -> int:
    return _count
