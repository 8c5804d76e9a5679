"""Rolling snapshots for ``rollback``: model, optimizer, scheduler, GradScaler and RNG state,
taken at a step boundary every ``every`` steps, the newest ``keep`` kept on the CPU (or in
``directory`` with ``torch.save``).

A snapshot "at step s" is taken in ``run.step`` of step s, before ``optimizer.step()``: it
holds the weights step s trained on. Restoring it at a later boundary puts the run back to
the start of step s (the controller drops that step's update, whose gradients came from the
replaced weights). Taking one copies every weight and optimizer tensor to the host: opt in
with a cadence that fits (on a GPU, a snapshot synchronises).
"""

from __future__ import annotations

import copy
import os
import random
import sys
from collections import deque
from pathlib import Path
from typing import Any

import torch


class Snapshots:
    def __init__(self, every: int, keep: int = 3, directory: str | os.PathLike[str] | None = None) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"snapshot_every must be a positive int, got {every!r}")
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"snapshot_keep must be a positive int, got {keep!r}")
        self.every, self.keep = every, keep
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._kept: deque[tuple[int, Any]] = deque()  # (step, state dict or file path), oldest first

    def steps(self) -> list[int]:
        return [s for s, _ in self._kept]

    def maybe_take(self, step: int, target: Any) -> bool:
        if step % self.every or (self._kept and self._kept[-1][0] == step):
            return False
        self.take(step, target)
        return True

    def take(self, step: int, target: Any) -> None:
        state = {
            "step": step,
            "model": _to_cpu(target.model.state_dict()) if target.model is not None else None,
            "optimizer": _to_cpu(target.optimizer.state_dict()) if target.optimizer is not None else None,
            "scheduler": copy.deepcopy(target.scheduler.state_dict()) if _has_state(target.scheduler) else None,
            "scaler": copy.deepcopy(target.scaler.state_dict()) if _has_state(target.scaler) else None,
            "rng": _rng_state(),
        }
        item: Any = state
        if self.directory is not None:
            path = self.directory / f"snapshot-{step:012d}.pt"
            torch.save(state, path)
            item = path
        self._kept.append((step, item))
        while len(self._kept) > self.keep:
            _, old = self._kept.popleft()
            if isinstance(old, Path):
                old.unlink(missing_ok=True)

    def restore(self, target: Any, at_or_before: int) -> int | None:
        """Load the newest snapshot at or before ``at_or_before``; its step, or None."""
        chosen = None
        for step, item in self._kept:
            if step <= at_or_before:
                chosen = (step, item)
        if chosen is None:
            return None
        step, item = chosen
        state = torch.load(item, weights_only=False) if isinstance(item, Path) else item
        if target.model is not None and state["model"] is not None:
            target.model.load_state_dict(state["model"])
        if target.optimizer is not None and state["optimizer"] is not None:
            target.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if target.scheduler is not None and state["scheduler"] is not None:
            target.scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
        if target.scaler is not None and state["scaler"] is not None:
            target.scaler.load_state_dict(copy.deepcopy(state["scaler"]))
        _set_rng_state(state["rng"])
        # Later snapshots describe a future that no longer happens.
        while self._kept and self._kept[-1][0] > step:
            _, dropped = self._kept.pop()
            if isinstance(dropped, Path):
                dropped.unlink(missing_ok=True)
        return step


def _has_state(obj: Any) -> bool:
    return obj is not None and callable(getattr(obj, "state_dict", None))


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = sys.modules.get("numpy")
    if "numpy" in state and numpy is not None:
        numpy.random.set_state(state["numpy"])
