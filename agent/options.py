"""Agent options: keyword arguments to ``trimtab.init`` win over ``TRIMTAB_*`` environment
variables, which win over the defaults below."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from trimtab.addresses import is_loopback
from trimtab.local_token import local_token_path, read_local_token

DEFAULT_SERVER = "http://127.0.0.1:8000"


def default_spool_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trimtab" / "spool"


@dataclass
class Options:
    server: str = DEFAULT_SERVER
    project: str = "default"
    name: str | None = None
    token: str | None = None
    # Where unacked batches are written; "" or "off" keeps them in memory only.
    spool_dir: str | None = None
    # Sender: a batch closes at this many points or after this many seconds.
    flush_interval: float = 0.2
    max_batch_points: int = 16384
    # log() calls held before the sender drains them; past this, log() drops and counts.
    max_queue: int = 200_000
    # Bytes of unacked batches kept in memory; older ones are re-read from the spool.
    max_memory_bytes: int = 64 * 1024 * 1024
    window: int = 32
    heartbeat_interval: float = 5.0
    connect_timeout: float = 10.0
    max_backoff: float = 30.0
    finish_timeout: float = 30.0
    # Replay spools that earlier, dead processes left for this server.
    replay_orphans: bool = True
    rank: int = 0
    world_size: int = 1
    # The run's unique id. Processes that give the same one are ranks of one run. Left
    # unset, ranks of a torch.distributed job agree on one through its store (see Run).
    run_uid: str | None = None
    # How long a rank > 0 waits at init for rank 0 to publish the run's uid.
    rank_sync_timeout: float = 60.0
    config: dict[str, Any] = field(default_factory=dict)
    # The first step when run.step / run.log are given none: a script resuming from a
    # checkpoint at iteration N passes start_step=N and its steps go on from there.
    start_step: int = 0

    @property
    def spool_path(self) -> Path | None:
        if self.spool_dir is None:
            return default_spool_dir()
        if self.spool_dir in ("", "off", "none"):
            return None
        return Path(self.spool_dir).expanduser()

    @property
    def ws_url(self) -> str:
        from trimtab.protocol import WS_PATH

        url = self.server.strip()
        for http, ws in (("https://", "wss://"), ("http://", "ws://")):
            if url.startswith(http):
                url = ws + url[len(http) :]
                break
        else:
            if not url.startswith(("ws://", "wss://")):
                url = "ws://" + url
        return url.rstrip("/") + WS_PATH


_ENV_RANK = ("RANK", "WORLD_SIZE")


def resolve(kwargs: dict[str, Any], environ: dict[str, str] | None = None) -> Options:
    """Build Options from keyword arguments, then ``TRIMTAB_<NAME>``, then defaults.

    Unknown keyword arguments raise TypeError at ``init`` (a typo is a programming error, and
    ``init`` runs before training starts). Rank and world size also come from torchrun's
    ``RANK`` and ``WORLD_SIZE`` when not given, or else from an initialised torch.distributed.
    """
    env = os.environ if environ is None else environ
    known = {f.name: f for f in fields(Options)}
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise TypeError(f"trimtab.init() got unknown option(s) {unknown}; known options: {sorted(known)}")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name in kwargs and kwargs[name] is not None:
            values[name] = kwargs[name]
            continue
        raw = env.get(f"TRIMTAB_{name.upper()}")
        if raw is None and name in ("rank", "world_size"):
            raw = env.get(name.upper())
        if raw is None or name == "config":
            continue
        values[name] = _parse(name, raw, f)
    if "rank" not in values and "world_size" not in values:
        values.update(_distributed_rank())
    opts = Options(**values)
    _check_server_url(opts.ws_url, opts.server)
    if type(opts.start_step) is not int or opts.start_step < 0:
        raise ValueError(f"trimtab.init: start_step must be an integer >= 0, got {opts.start_step!r}")
    if opts.token is None and is_loopback(urlsplit(opts.ws_url).hostname or ""):
        # A server on this machine leaves a token for its agents (local_token.py).
        opts.token = read_local_token(local_token_path(env))
    return opts


def _distributed_rank() -> dict[str, int]:
    """Rank and world size of an initialised torch.distributed job (torch is not imported here)."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return {"rank": int(dist.get_rank()), "world_size": int(dist.get_world_size())}
    except Exception:  # a half-torn-down process group: fall back to the defaults
        pass
    return {}


def _check_server_url(ws_url: str, given: str) -> None:
    """A malformed server URL is a programming error: say so at init, not forever in a log."""
    try:
        parts = urlsplit(ws_url)
        port = parts.port  # raises ValueError when out of range
    except ValueError as exc:
        raise ValueError(f"trimtab.init: server={given!r} is not a valid URL ({exc})") from None
    foreign_scheme = "://" in given and given.split("://", 1)[0].lower() not in ("http", "https", "ws", "wss")
    if foreign_scheme or parts.scheme not in ("ws", "wss") or not parts.hostname or port == 0:
        raise ValueError(f"trimtab.init: server={given!r} is not a valid http(s):// or ws(s):// URL")


def _parse(name: str, raw: str, f: dataclasses.Field[Any]) -> Any:
    default = f.default
    try:
        if isinstance(default, bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(
            f"environment variable TRIMTAB_{name.upper()}={raw!r} is not a valid {type(default).__name__}"
        ) from None
    return raw
