"""Which database errors mean "try again later" and which mean "this data can never be stored".

The ingest writer answers the first kind with ``store_unavailable`` (the agent keeps the
batch and resends it) and the second with ``invalid_batch`` (the agent drops it), so a
database that is merely slow, locked, full or restarting never costs a batch.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy import exc as sa_exc

try:
    import psycopg
except ImportError:  # pragma: no cover - psycopg comes with the server extra
    psycopg = None  # type: ignore[assignment]


def is_data_error(error: BaseException) -> bool:
    """True only when the rows themselves are refused (a value, a constraint, an encoding)."""
    if isinstance(error, sa_exc.StatementError) and error.orig is not None:
        error = error.orig  # DBAPIError wraps the driver's error; StatementError a Python one
    if isinstance(error, (sqlite3.DataError, sqlite3.IntegrityError)):
        return True
    if psycopg is not None and isinstance(error, (psycopg.DataError, psycopg.IntegrityError)):
        return True
    # Python-side conversion of a value (JSON encoding, integer range) before it is sent
    return isinstance(error, (TypeError, ValueError, OverflowError, UnicodeError))
