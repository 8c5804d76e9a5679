"""Histograms: the host and device implementations agree, and non-finite values never crash them."""

from __future__ import annotations

import math

import pytest
import torch

from trimtab.histogram import _device, _host, histogrammable, summarize, to_host

BINS = 16


def _both(x: torch.Tensor) -> tuple[list[int], list[int], tuple[float, float], tuple[float, float]]:
    h, d = _host(x, BINS), _device(x, BINS)
    return h.counts.tolist(), d.counts.tolist(), tuple(h.span.tolist()), tuple(d.span.tolist())  # type: ignore[return-value]


def test_counts_match_a_reference_histogram() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    lo, hi = float(x.min()), float(x.max())
    reference = [0] * BINS
    for v in x.tolist():
        reference[min(int((v - lo) / (hi - lo) * BINS), BINS - 1)] += 1
    host, device, hspan, dspan = _both(x)
    # float32 rounding at a bin edge may move an element by one bin
    assert sum(abs(a - b) for a, b in zip(host[:BINS], reference, strict=True)) <= 4
    assert host == device
    assert hspan[0] == pytest.approx(lo) and hspan[1] == pytest.approx(hi - lo)
    assert dspan == pytest.approx(hspan)
    assert host[BINS:] == [0, 0, 0]


def test_non_finite_values_are_counted_apart() -> None:
    x = torch.tensor([1.0, 2.0, math.nan, math.inf, -math.inf, -math.inf, 3.0, math.nan])
    host, device, hspan, _ = _both(x)
    assert host == device
    assert host[BINS:] == [2, 1, 2]
    assert sum(host[:BINS]) == 3
    assert hspan == (1.0, 2.0)


@pytest.mark.parametrize(
    "x",
    [torch.full((5,), math.nan), torch.full((3,), math.inf), torch.zeros(7), torch.tensor([4.0])],
    ids=["all-nan", "all-inf", "constant", "single"],
)
def test_degenerate_tensors_give_finite_increasing_edges(x: torch.Tensor) -> None:
    host, device, hspan, dspan = _both(x)
    assert host == device and hspan == pytest.approx(dspan)
    h = to_host(host, hspan[0], hspan[1], BINS)
    assert all(math.isfinite(e) for e in h.edges) and h.edges == sorted(h.edges) and h.edges[0] < h.edges[-1]
    assert sum(h.counts) + h.nan + h.pinf + h.ninf == x.numel()


def test_integer_and_half_tensors() -> None:
    ints = summarize(torch.arange(32), BINS)
    assert ints.counts[:BINS].tolist() == [2] * BINS
    half = summarize(torch.randn(1000).half(), BINS)
    assert int(half.counts.sum()) == 1000


def test_what_can_be_histogrammed() -> None:
    assert histogrammable(torch.ones(3))
    assert not histogrammable(torch.ones(3, dtype=torch.complex64))
    assert not histogrammable(torch.ones(0))
    assert not histogrammable(torch.ones(3, dtype=torch.bool))


def test_to_host_edges() -> None:
    h = to_host([1, 2, 3, 4, 5, 6, 7], -1.0, 2.0, 4)
    assert h.edges == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert (h.counts, h.nan, h.pinf, h.ninf) == ([1, 2, 3, 4], 5, 6, 7)


def test_bfloat16_tensors_are_binned_in_float32() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(2)).bfloat16()
    host, device, _, _ = _both(x)
    assert host == device
    reference = _host(x.float(), BINS).counts.tolist()
    assert host == reference


def test_chunked_passes_match_a_single_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import trimtab.histogram as histogram

    x = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    x[17], x[4000] = math.nan, -math.inf
    whole = _device(x, BINS)
    monkeypatch.setattr(histogram, "DEVICE_CHUNK", 999)
    monkeypatch.setattr(histogram, "CHUNK", 999)
    assert _device(x, BINS).counts.tolist() == whole.counts.tolist() == _host(x, BINS).counts.tolist()


def test_the_deterministic_path_counts_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    import trimtab.histogram as histogram

    x = torch.randn(20_000, generator=torch.Generator().manual_seed(4)) * 3
    x[5], x[6], x[7], x[8] = math.nan, math.inf, -math.inf, math.inf
    fast = _device(x, 50).counts.tolist()  # 50 bins: edges that are not powers of two
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    calls: list[int] = []
    scatter = histogram._count_scatter

    def counted(*args: torch.Tensor | int) -> None:
        calls.append(1)
        scatter(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(histogram, "_count_scatter", counted)
    assert _device(x, 50).counts.tolist() == fast and calls
    assert fast[50:] == [1, 2, 1] and sum(fast) == x.numel()
