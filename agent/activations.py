"""Activation statistics per module, from forward hooks that exist only on sampled steps.

``arm()`` registers one forward hook on each watched module; the hooks record, for the
first forward pass with gradients enabled (so not validation, and not an activation-
checkpointing recompute), the output's mean, std, max |x|, fraction of exact zeros and a
histogram, all as device tensors. ``collect()`` removes the hooks and returns what they saw.
The order in which the hooks fired is the modules' forward order, which NaN provenance uses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from trimtab.histogram import Summary, histogrammable, summarize

logger = logging.getLogger("trimtab")

STATS = ("mean", "std", "max_abs", "zero_frac")
STATS_CHUNK = 1 << 22  # elements per pass of the statistics


@dataclass
class Seen:
    names: list[str] = field(default_factory=list)  # forward order
    stats: list[torch.Tensor] = field(default_factory=list)  # float32 [4] each
    hists: list[Summary] = field(default_factory=list)  # parallel to names, when histograms are on
    seconds: float = 0.0


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a module produced: itself, or the first tensor of a tuple or list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def default_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules (no children), named by their path; a leaf root is called ``model``."""
    return [(name or "model", m) for name, m in model.named_modules() if next(m.children(), None) is None]


class ActivationProbe:
    def __init__(
        self,
        modules: list[tuple[str, nn.Module]],
        bins: int,
        histograms: bool,
        warn: Callable[[str, str], None],
    ) -> None:
        self.modules = modules
        self.bins = bins
        self.histograms = histograms
        self._warn = warn
        self._handles: list[RemovableHandle] = []
        self._seen = Seen()
        self._done: set[str] = set()
        self._broken: set[str] = set()

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        if self._handles:
            return
        self._seen, self._done = Seen(), set()
        for name, module in self.modules:
            if name not in self._broken:
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def collect(self) -> Seen:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        seen, self._seen = self._seen, Seen()
        return seen

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in self._done or not torch.is_grad_enabled():
                return
            start = time.perf_counter()
            self._done.add(name)
            try:
                x = first_tensor(output)
                if x is None or not histogrammable(x) or not (x.is_floating_point()):
                    return
                stats, hist = self._summarize(x.detach())
                self._seen.names.append(name)
                self._seen.stats.append(stats)
                if hist is not None:
                    self._seen.hists.append(hist)
            except Exception as exc:  # an odd output type must not break training: skip this module
                self._broken.add(name)
                self._warn(f"act:{name}", f"activation statistics of module {name!r} failed ({exc!r}); skipping it")
            finally:
                self._seen.seconds += time.perf_counter() - start

        return hook

    def _summarize(self, x: torch.Tensor) -> tuple[torch.Tensor, Summary | None]:
        """mean, std (unbiased), max |x| and the zero fraction, accumulated over chunks so that
        the logits of a large vocabulary never get a full float32 copy."""
        flat = x.reshape(-1)
        n = flat.numel()
        acc = torch.float32 if flat.device.type == "mps" else torch.float64  # MPS has no float64
        total = torch.zeros((), dtype=acc, device=flat.device)
        squares = torch.zeros((), dtype=acc, device=flat.device)
        max_abs = torch.zeros((), dtype=torch.float32, device=flat.device)
        nonzero = torch.zeros((), dtype=torch.int64, device=flat.device)
        for at in range(0, n, STATS_CHUNK):
            chunk = flat[at : at + STATS_CHUNK].float()
            total += chunk.sum(dtype=acc)
            squares += chunk.square().sum(dtype=acc)
            max_abs = torch.maximum(max_abs, chunk.abs().amax())
            nonzero += torch.count_nonzero(chunk)
        mean = total / n
        var = ((squares - total * mean) / max(n - 1, 1)).clamp_(min=0.0)
        stats = torch.stack([mean.float(), var.sqrt().float(), max_abs, (1.0 - nonzero.to(acc) / n).float()])
        return stats, summarize(x, self.bins) if self.histograms else None
