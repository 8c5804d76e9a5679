"""Delivery of commands to the agents connected to this process.

Three paths get a command to an agent, and each agent connection remembers the ids it has
sent, so none of them sends one twice on a connection:

- a POST to this process pushes the new command at once to every live connection of its
  run (every rank);
- an agent connecting (after ``welcome``) gets every open command of its run, oldest first,
  so a command sent while it was offline goes out on reconnect;
- the sweep, every ``sweep_s``, expires the commands past their ``expires_at`` and sends the
  open commands of the runs connected here that a connection has not had yet: those created
  through another server replica.

Everything here runs on the event loop; the database is read and written in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from starlette.concurrency import run_in_threadpool

from trimtab.errors import TrimtabError
from trimtab.server.commands import store as db
from trimtab.server.commands.store import Command
from trimtab.server.db.store import Store

logger = logging.getLogger("trimtab.server")


class CommandLink(Protocol):
    """An agent connection as the hub sees it."""

    run_id: int
    rank: int

    def send_command(self, command: Command) -> None:
        """Queue a ``cmd`` frame unless this connection already sent that id."""


class CommandHub:
    def __init__(self, store: Store, sweep_s: float = 1.0) -> None:
        self.store = store
        self.sweep_s = sweep_s
        self._links: dict[int, set[CommandLink]] = {}
        self._task: asyncio.Task[None] | None = None

    def runs(self) -> list[int]:
        return sorted(self._links)

    async def connected(self, link: CommandLink) -> None:
        """A new agent connection: register it, then send the run's open commands. In this
        order, a command posted meanwhile is either pushed to it or read here (or both)."""
        self._links.setdefault(link.run_id, set()).add(link)
        for command in await run_in_threadpool(db.open_commands, self.store, [link.run_id]):
            link.send_command(command)

    def disconnected(self, link: CommandLink) -> None:
        links = self._links.get(link.run_id)
        if links is not None:
            links.discard(link)
            if not links:
                del self._links[link.run_id]

    def push(self, command: Command) -> None:
        """Send a command to every connection of its run in this process."""
        for link in list(self._links.get(command.run_id, ())):
            link.send_command(command)

    async def sweep(self) -> None:
        """Expire what is overdue, then send what the connections here have not had."""
        expired = await run_in_threadpool(db.expire, self.store)
        if expired:
            logger.info("%d command(s) expired before their agent applied them", expired)
        if not self._links:
            return
        for command in await run_in_threadpool(db.open_commands, self.store, self.runs()):
            self.push(command)

    def start(self) -> None:
        """Start the sweep; call on the server's event loop."""
        self._task = asyncio.get_running_loop().create_task(self._sweep_loop(), name="trimtab-command-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                await self.sweep()
            except TrimtabError as exc:  # the database is away: try again next time
                logger.warning("command sweep: %s", exc.message)
            except Exception:
                logger.exception("command sweep failed; trying again in %.1f s", self.sweep_s)
