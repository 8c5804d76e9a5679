"""What both framework callbacks share: owning (or borrowing) a Run, and summing the loss of
micro-batches on the device until the optimizer step."""

from __future__ import annotations

from typing import Any

import torch

import trimtab
from trimtab.run import Run


class RunHolder:
    def __init__(self, run: Run | None, watch: dict[str, Any] | None, init: dict[str, Any]) -> None:
        self.run = run
        self.owns_run = run is None
        self.watch_options = dict(watch or {})
        self.init_options = init
        self._loss: torch.Tensor | None = None

    def ensure_run(self, rank: int, world_size: int) -> Run:
        if self.run is None:
            options = {"rank": rank, "world_size": world_size, **self.init_options}
            self.run = trimtab.init(**options)
        return self.run

    def add_loss(self, loss: Any) -> None:
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            value = loss.detach().float().reshape(())
            self._loss = value if self._loss is None else self._loss + value

    def take_loss(self) -> torch.Tensor | None:
        loss, self._loss = self._loss, None
        return loss

    def end(self) -> None:
        if self.run is None:
            return
        self.run.unwatch()
        if self.owns_run:
            self.run.finish()
            self.run = None  # a second fit() starts a new run
