"""The token a server on this machine leaves for the agents and the dashboard on it.

``trimtab server`` on its embedded database with auth on (the first-time setup) keeps a token
with the ``ingest``, ``read`` and ``control`` scopes in ``<data dir>/local-token``, readable
by its owner only, and prints a link that logs the browser in with it. ``trimtab.init`` given
no token, talking to a server on a loopback address, uses that file when it exists: the
README's two-line attach works as written. A server elsewhere, or a token passed explicitly,
never touches it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger("trimtab")

FILE_NAME = "local-token"


def default_data_dir() -> Path:
    """Where the server keeps its embedded database (``TRIMTAB_DATA_DIR`` overrides)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "trimtab"


def local_token_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    data_dir = env.get("TRIMTAB_DATA_DIR")
    return (Path(data_dir).expanduser() if data_dir else default_data_dir()) / FILE_NAME


def read_local_token(path: Path) -> str | None:
    """The token in ``path``, or None when there is none (or it cannot be read)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def write_local_token(path: Path, token: str) -> None:
    """Write ``token`` to ``path``, readable and writable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)  # a file that existed keeps its mode through O_CREAT
