"""Histograms of tensors with an adaptive range, computed where the tensor lives.

Every histogram has ``bins`` equal bins spanning the tensor's finite minimum to maximum;
NaN, +Inf and -Inf are counted apart and never binned, so a histogram of a tensor full of
NaN is still a histogram (all counts zero, ``nan`` = numel). A constant tensor gets a bin
of width 1 around its value.

Two implementations give the same answer:

* **host** (CPU tensors): reads the range with one ``aminmax`` and counts with ``bincount``
  over chunks (an order of magnitude faster than ``torch.histc`` on CPU);
* **device** (accelerators): never reads anything back. The range, the bin index of every
  element and the counts are computed on the device into two small tensors per histogram,
  which the caller stacks and copies to the host asynchronously.

Both return a :class:`Summary`: ``counts`` is int64 ``[bins + 3]`` (the bins, then NaN,
+Inf, -Inf) and ``span`` is float ``[2]`` (low edge, width of the whole range).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch

# Elements per pass: keeps the int64 index temporaries small (and in cache on CPU).
CHUNK = 1 << 18
DEVICE_CHUNK = 1 << 24


class Summary(NamedTuple):
    counts: torch.Tensor  # int64 [bins + 3]: bins, nan, +inf, -inf
    span: torch.Tensor  # float [2]: low edge, range width


@dataclass(frozen=True)
class HostHistogram:
    edges: list[float]
    counts: list[int]
    nan: int
    pinf: int
    ninf: int


def histogrammable(t: torch.Tensor) -> bool:
    """Real floating-point or integer tensors with at least one element (complex is not)."""
    return t.numel() > 0 and not t.is_complex() and not t.is_sparse and t.dtype != torch.bool


def summarize(t: torch.Tensor, bins: int) -> Summary:
    """The histogram of ``t`` as device tensors; no host-device synchronisation off the CPU."""
    x = t.detach().reshape(-1)
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if x.device.type == "cpu":
        return _host(x, bins)
    return _device(x, bins)


def to_host(counts: list[int], lo: float, width: float, bins: int) -> HostHistogram:
    """Edges and counts from one row of summaries read back to the host."""
    top = sys.float_info.max
    if not math.isfinite(lo) or not math.isfinite(width) or width <= 0:
        lo, width = (lo if math.isfinite(lo) else 0.0), (width if math.isfinite(width) and width > 0 else top)
    step = width / bins
    edges = [min(max(lo + step * i, -top), top) for i in range(bins)]
    edges.append(min(lo + width, top))
    return HostHistogram(
        edges=edges, counts=counts[:bins], nan=counts[bins], pinf=counts[bins + 1], ninf=counts[bins + 2]
    )


def _host(x: torch.Tensor, bins: int) -> Summary:
    lo_t, hi_t = torch.aminmax(x)
    lo, hi = float(lo_t), float(hi_t)
    nan = pinf = ninf = 0
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = torch.isfinite(x)
        n_finite = int(finite.sum())
        nan = int(torch.isnan(x).sum())
        pinf = int((x == math.inf).sum())
        ninf = x.numel() - n_finite - nan - pinf
        x = x[finite]
        if n_finite:
            lo_t, hi_t = torch.aminmax(x)
            lo, hi = float(lo_t), float(hi_t)
        else:
            lo = hi = 0.0
    lo, width = _range(lo, hi)
    counts = torch.zeros(bins + 3, dtype=torch.int64)
    if x.numel():
        scale = bins / width
        # float32 at least (bf16 would misplace bins); float64 where (x - lo) could overflow
        work = torch.float64 if width > 1e30 or x.dtype == torch.float64 else torch.float32
        for at in range(0, x.numel(), CHUNK):
            chunk = x[at : at + CHUNK].to(work)  # out of place below: chunk may be x itself
            index = chunk.sub(lo).mul_(scale).to(torch.int64).clamp_(0, bins - 1)
            counts[:bins] += torch.bincount(index, minlength=bins)
    counts[bins], counts[bins + 1], counts[bins + 2] = nan, pinf, ninf
    return Summary(counts, torch.tensor([lo, width], dtype=torch.float64))


def _range(lo: float, hi: float) -> tuple[float, float]:
    """(low edge, width) of the bins. float32 rounding may make ``hi - lo`` overflow."""
    width = hi - lo
    if not width > 0 or not math.isfinite(width):
        if hi > lo:  # the range overflows a float: clamp it
            return lo, sys.float_info.max
        return lo - 0.5, 1.0
    return lo, width


def _device(x: torch.Tensor, bins: int) -> Summary:
    """Two passes over chunks (range, then counts): temporaries stay chunk-sized, so a
    histogram of a bf16 logits tensor never makes a full float32 copy of it."""
    chunks = [x[at : at + DEVICE_CHUNK] for at in range(0, x.numel(), DEVICE_CHUNK)]
    lo = torch.full((), math.inf, device=x.device)
    hi = torch.full((), -math.inf, device=x.device)
    for raw in chunks:
        chunk = raw.float()
        finite = torch.isfinite(chunk)
        lo = torch.minimum(lo, torch.where(finite, chunk, math.inf).amin())
        hi = torch.maximum(hi, torch.where(finite, chunk, -math.inf).amax())
    has_range = hi > lo
    none_finite = torch.isinf(lo)  # amin of nothing finite is +inf
    lo = torch.where(none_finite, 0.0, lo)
    width = torch.where(has_range, hi - lo, 1.0).clamp_(max=torch.finfo(torch.float32).max)
    lo = torch.where(has_range, lo, lo - 0.5)
    scale = bins / width
    count = _count_scatter if torch.are_deterministic_algorithms_enabled() else _count_histc
    counts = torch.zeros(bins + 3, dtype=torch.int64, device=x.device)
    for raw in chunks:
        chunk = raw.float()
        position = ((chunk - lo) * scale).floor_().clamp_(0, bins - 1)  # the bin, as a float; NaN stays NaN
        count(counts, chunk, position, bins)
    return Summary(counts, torch.stack([lo, width]).float())


def _count_histc(counts: torch.Tensor, chunk: torch.Tensor, position: torch.Tensor, bins: int) -> None:
    """``histc`` over the bin positions with a fixed range: shared-memory counters on CUDA
    (an order of magnitude faster than scatter_add_'s atomics on one small array) and no
    range read back. A position is a whole number: + 0.5 puts it mid-bin, away from any
    rounding at an edge; non-finite elements move out of the range and are counted apart."""
    position.add_(0.5).masked_fill_(~torch.isfinite(chunk), -1.0)
    counts[:bins] += torch.histc(position, bins, 0, bins).to(torch.int64)  # float32 is exact: chunks <= 2**24
    counts[bins:] += torch.stack([chunk.isnan().sum(), chunk.isposinf().sum(), chunk.isneginf().sum()])


def _count_scatter(counts: torch.Tensor, chunk: torch.Tensor, position: torch.Tensor, bins: int) -> None:
    """The same counts by ``scatter_add_``, which has a deterministic implementation (``histc``
    on CUDA has none: it would raise under ``torch.use_deterministic_algorithms(True)``)."""
    index = position.nan_to_num_(0.0).to(torch.int64)
    special = torch.where(torch.isnan(chunk), bins, torch.where(chunk > 0, bins + 1, bins + 2))
    index = torch.where(torch.isfinite(chunk), index, special)
    counts.scatter_add_(0, index, torch.ones((), dtype=torch.int64, device=chunk.device).expand(index.numel()))
