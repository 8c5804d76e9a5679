"""Activation statistics per module, from forward hooks that exist only on sampled steps.

``arm()`` registers one forward hook on each watched module; the hooks record, for the
first forward pass with gradients enabled (so not validation, and not an activation-
checkpointing recompute), the output's mean, std, max |x|, fraction of exact zeros and a
histogram, all as device tensors; for a Linear or convolution layer also the fraction of its
*input* that is (near) zero: the post-activation values, so units killed behind a
functional ``F.relu`` (no module of its own) are seen too. ``collect()`` removes the hooks and returns what they saw.
The order in which the hooks fired is the modules' forward order, which NaN provenance uses.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from trimtab.histogram import Summary, histogrammable, summarize

logger = logging.getLogger("trimtab")

STATS = ("mean", "std", "max_abs", "zero_frac", "input_zero_frac")
# A layer input value this close to zero counts as zero: exact zeros behind ReLU, and a GELU or
# SiLU unit whose pre-activation sits below about -5 (dead in practice) gives less than this.
INPUT_ZERO_TOL = 1e-6
# Layers whose input is a unit activation: torch's, and Hugging Face's GPT-2 style Conv1D.
_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYER_NAMES = frozenset({"Conv1D"})
STATS_CHUNK = 1 << 22  # elements per pass of the statistics


@dataclass
class Seen:
    names: list[str] = field(default_factory=list)  # forward order
    stats: list[torch.Tensor] = field(default_factory=list)  # float32 [len(STATS)] each (NaN: not measured)
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


def layer_input(module: nn.Module, args: Any) -> torch.Tensor | None:
    """The input of a Linear or convolution layer when it is a unit activation: a float tensor
    inside the autograd graph (the data fed to a first layer is not: a sparse one-hot input
    is no dead unit)."""
    if not (isinstance(module, _LAYER_TYPES) or type(module).__name__ in _LAYER_NAMES):
        return None
    x = first_tensor(args)
    if x is None or not x.is_floating_point() or not x.requires_grad or not histogrammable(x):
        return None
    return x


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
                inp = layer_input(module, args)
                stats, hist = self._summarize(x.detach(), None if inp is None else inp.detach())
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

    def _summarize(self, x: torch.Tensor, inp: torch.Tensor | None) -> tuple[torch.Tensor, Summary | None]:
        """mean, std (unbiased), max |x|, the zero fraction, and the near-zero fraction of the
        layer's input (NaN without one), accumulated over chunks so that the logits of a large
        vocabulary never get a full float32 copy."""
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
        stats = [mean.float(), var.sqrt().float(), max_abs, (1.0 - nonzero.to(acc) / n).float()]
        stats.append(_near_zero_fraction(inp).to(flat.device) if inp is not None else max_abs.new_full((), math.nan))
        return torch.stack(stats), summarize(x, self.bins) if self.histograms else None


def _near_zero_fraction(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1)
    zeros = torch.zeros((), dtype=torch.int64, device=flat.device)
    for at in range(0, flat.numel(), STATS_CHUNK):
        zeros += (flat[at : at + STATS_CHUNK].abs() <= INPUT_ZERO_TOL).sum()
    return zeros.float() / max(flat.numel(), 1)
