"""Device-to-host copies that never make the training thread wait.

On CUDA, ``submit`` starts a ``non_blocking`` copy into pinned host memory and records an
event; ``poll`` hands over every copy whose event has completed (``Event.query`` does not
synchronise). On the CPU there is nothing to wait for and the callback runs at once. Other
accelerators are read back synchronously (they have no portable event API here); the
first such copy logs a note.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger("trimtab")

Callback = Callable[[list[torch.Tensor]], None]


class Transfers:
    def __init__(self) -> None:
        self._pending: deque[tuple[Any, list[torch.Tensor], Callback]] = deque()
        self._noted_sync = False

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, tensors: list[torch.Tensor], callback: Callback) -> None:
        devices = {t.device.type for t in tensors}
        if devices <= {"cpu"}:
            callback(tensors)
            return
        if devices == {"cuda"}:
            device = tensors[0].device
            tensors = [t.to(device, non_blocking=True) for t in tensors]  # model parallel: one device
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            with torch.cuda.device(device):  # the copies and the event on that device's stream
                for dst, src in zip(host, tensors, strict=True):
                    dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record()
            self._pending.append((event, host, callback))
            return
        if not self._noted_sync:
            self._noted_sync = True
            logger.info("trimtab: statistics on %s are read back synchronously", sorted(devices - {"cpu"}))
        callback([t.cpu() for t in tensors])

    def poll(self, wait: bool = False) -> None:
        """Run the callbacks of finished copies, in submission order; ``wait`` waits for all."""
        while self._pending:
            event, host, callback = self._pending[0]
            if wait:
                event.synchronize()
            elif not event.query():
                return
            self._pending.popleft()
            callback(host)
