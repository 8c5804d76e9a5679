"""Downsampling keeps every bucket's extremes and non-finite values, within max_points."""

from __future__ import annotations

import math
import random

import pytest

from trimtab.server.downsample import count_nonfinite, select_indices


def test_small_series_is_returned_whole() -> None:
    assert select_indices([1, 2, 3], [1.0, 2.0, 3.0], 10) == [0, 1, 2]


def test_spikes_survive_heavy_downsampling() -> None:
    rng = random.Random(0)
    n = 100_000
    values = [1.0 + rng.random() * 0.01 for _ in range(n)]
    spikes = {12_345: 50.0, 77_777: -40.0, 99_999: 1e6}
    for i, v in spikes.items():
        values[i] = v
    keep = select_indices(list(range(n)), values, 200)
    assert len(keep) <= 200
    assert set(spikes) <= set(keep)
    assert keep == sorted(keep)


def test_nonfinite_values_are_always_kept_and_the_cap_holds() -> None:
    n = 50_000
    values = [float(i % 7) for i in range(n)]
    marks = {10: math.nan, 20_000: math.inf, 40_000: -math.inf}
    for i, v in marks.items():
        values[i] = v
    keep = select_indices(list(range(n)), values, 100)
    assert set(marks) <= set(keep)
    assert len(keep) <= 100


def test_all_nan_series_still_respects_the_cap() -> None:
    keep = select_indices(list(range(10_000)), [math.nan] * 10_000, 50)
    assert 0 < len(keep) <= 50
    assert 0 in keep


@pytest.mark.parametrize("max_points", [2, 3, 7, 1000])
def test_cap_holds_for_any_max_points(max_points: int) -> None:
    rng = random.Random(max_points)
    values = [rng.choice([math.nan, math.inf, -math.inf, rng.random()]) for _ in range(5000)]
    assert len(select_indices(list(range(5000)), values, max_points)) <= max_points


def test_count_nonfinite() -> None:
    assert count_nonfinite([1.0, math.nan, math.inf, -math.inf, math.nan]) == {"nan": 2, "posinf": 1, "neginf": 1}
