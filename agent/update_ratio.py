"""The update ratio ||dW|| / ||W|| per parameter, on sampled steps.

Before the optimizer steps, a fixed random sample of ``UPDATE_SAMPLE`` elements of each
parameter is copied (the whole tensor when it is smaller); the optimizer's step post-hook
compares the new values with them on the device and hands the norms to ``Transfers``. An
optimizer that does not step after a sampled step (a GradScaler skip) leaves nothing behind:
the next ``run.step`` forgets the capture.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from trimtab.overhead import OverheadMeter
from trimtab.transfer import Transfers

UPDATE_SAMPLE = 4096  # elements per parameter the update ratio is estimated from

Emit = Callable[[int, float, dict[str, float]], None]


class UpdateRatios:
    def __init__(
        self,
        names: Sequence[str],
        params: Sequence[torch.Tensor],
        transfers: Transfers,
        meter: OverheadMeter,
        emit: Emit,
        warn: Callable[[str, str], None],
    ) -> None:
        self.names, self.params = names, params
        self.transfers, self.meter = transfers, meter
        self.emit, self.warn = emit, warn
        self.enabled = True
        self._captured: tuple[int, float, list[int], list[torch.Tensor | None], list[torch.Tensor]] | None = None
        self._index: dict[int, torch.Tensor] = {}

    def forget(self) -> None:
        """The optimizer did not step after the capture (a GradScaler skip): nothing to compare."""
        self._captured = None

    def capture(self, step: int, wall: float) -> None:
        """Before the optimizer step of a sampled step: keep the sampled elements' values."""
        if not self.enabled:
            return
        index, picks, before = [], [], []
        for i, p in enumerate(self.params):
            if p.is_complex() or not p.is_floating_point() or p.numel() == 0:
                continue
            pick = self._pick_index(i, p)
            index.append(i)
            picks.append(pick)
            before.append(_pick(p, pick).float().clone())
        if index:
            self._captured = (step, wall, index, picks, before)

    def after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """The optimizer's step post-hook: compare, and copy the norms to the host."""
        if self._captured is None:
            return
        start = time.perf_counter()
        try:
            step, wall, index, picks, before = self._captured
            self._captured = None
            with torch.no_grad():
                deltas, norms = [], []
                for i, pick, old in zip(index, picks, before, strict=True):
                    new = _pick(self.params[i], pick).float()
                    deltas.append(torch.linalg.vector_norm(new - old))
                    norms.append(torch.linalg.vector_norm(old))
                device = deltas[0].device
                packed = torch.stack(
                    [torch.stack([d.to(device) for d in deltas]), torch.stack([n.to(device) for n in norms])]
                )
            self.transfers.submit([packed], lambda host: self._emit(step, wall, index, host[0]))
        except Exception as exc:
            self._captured = None
            self.warn("ratio", f"update ratios are off: {exc!r}")
            self.enabled = False
        finally:
            self.meter.add(time.perf_counter() - start)

    def _emit(self, step: int, wall: float, index: list[int], packed: torch.Tensor) -> None:
        deltas, norms = packed.tolist()
        record = {
            f"update_ratio/{self.names[i]}": d / w
            for i, d, w in zip(index, deltas, norms, strict=True)
            if w > 0 and math.isfinite(w) and math.isfinite(d)
        }
        if record:
            self.emit(step, wall, record)

    def _pick_index(self, i: int, p: torch.Tensor) -> torch.Tensor | None:
        if p.numel() <= UPDATE_SAMPLE:
            return None
        pick = self._index.get(i)
        if pick is None or pick.device != p.device:
            gen = torch.Generator().manual_seed(i)
            pick = torch.randint(p.numel(), (UPDATE_SAMPLE,), generator=gen)
            if p.device.type == "cuda":  # a copy from pageable memory would synchronise (seen on an H200)
                pick = pick.pin_memory()
            pick = pick.to(p.device, non_blocking=True)
            self._index[i] = pick
        return pick


def _pick(p: torch.Tensor, pick: torch.Tensor | None) -> torch.Tensor:
    flat = p.detach().reshape(-1)
    return flat if pick is None else flat.index_select(0, pick)
