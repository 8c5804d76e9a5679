"""Commands on every rank at the same step, through the job's c10d store.

The server sends a command to every rank's connection, but ranks get it at different
moments. So only rank 0 schedules: at its step boundary s it writes the commands it has
received to the store with ``apply_at = s + 1`` (or ``s`` while the job is paused there,
since no rank can move on), and every rank, rank 0 included, applies the store's commands at
their ``apply_at`` boundary. When the gradient all-reduce blocks the CPU (gloo), a rank
reaches the boundary of step s + 1 only after rank 0 has left the boundary of step s, so the
entry is always there in time. NCCL's all-reduce does not block the CPU: a rank running
ahead of rank 0 can find an entry late; it applies it at once and reports ``late_steps``
(docs/control.md says so; an exact schedule for that case is still to do).

Cost: one store round trip per step and rank (``add(key, 0)`` reads the entry count), plus
one read per command. Only used when ``world_size > 1`` with an initialised process group.
"""

from __future__ import annotations

import json
from typing import Any

from trimtab.protocol import Command


class Lockstep:
    def __init__(self, store: Any, prefix: str, rank: int) -> None:
        self.store, self.prefix, self.rank = store, prefix, rank
        self._published = 0
        self._seen = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def publish(self, commands: list[Command], apply_at: int) -> None:
        """Rank 0: schedule ``commands`` for every rank at step ``apply_at``."""
        for command in commands:
            self._published += 1
            entry = {"id": command.id, "kind": command.kind, "args": command.args, "apply_at": apply_at}
            self.store.set(f"{self.prefix}/{self._published}", json.dumps(entry))
            self.store.add(f"{self.prefix}/count", 1)  # after the entry: a reader never sees a gap

    def poll(self) -> list[tuple[int, Command]]:
        """New scheduled commands, oldest first, as (apply_at, command)."""
        count = int(self.store.add(f"{self.prefix}/count", 0))
        out = []
        while self._seen < count:
            self._seen += 1
            entry = json.loads(bytes(self.store.get(f"{self.prefix}/{self._seen}")).decode())
            out.append((int(entry["apply_at"]), Command(entry["id"], entry["kind"], dict(entry["args"]))))
        return out
