"""trimtab: keep long training runs steady.

This package is the agent a training script imports. It needs only ``websockets`` and
``msgpack``; the server lives in ``trimtab.server`` (``pip install 'trimtab[server]'``).

    import trimtab
    run = trimtab.init(server="http://127.0.0.1:8000", project="gpt", name="baseline")
    for step in range(steps):
        ...
        run.log({"loss": loss.item()}, step=step)
    run.finish()
"""

from __future__ import annotations

from typing import Any

from trimtab.options import resolve
from trimtab.run import Run
from trimtab.version import __version__

__all__ = ["Run", "__version__", "init"]


def init(
    server: str | None = None,
    project: str | None = None,
    name: str | None = None,
    token: str | None = None,
    spool_dir: str | None = None,
    **options: Any,
) -> Run:
    """Start a run and its background sender. Never waits for the network.

    Every argument can also come from a ``TRIMTAB_<NAME>`` environment variable (for example
    ``TRIMTAB_SERVER``, ``TRIMTAB_TOKEN``); arguments win. See ``trimtab.options.Options``
    for every option and its default.
    """
    opts = resolve(
        {"server": server, "project": project, "name": name, "token": token, "spool_dir": spool_dir, **options}
    )
    return Run(opts)
