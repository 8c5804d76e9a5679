"""Detectors: what fires, what does not, and that a restored detector behaves identically."""

from __future__ import annotations

import json
import math
import random

import pytest

from trimtab.detectors import (
    CRITICAL,
    WARNING,
    Band,
    Detector,
    Divergence,
    Finding,
    GrossMagnitude,
    NonFinite,
    OverflowRate,
    RobustSpike,
    Threshold,
)


def run(detector: Detector, values: list[float], start: int = 0) -> dict[int, float]:
    """step -> value of every finding."""
    found = {}
    for step, value in enumerate(values, start):
        finding = detector.update(step, value)
        if finding is not None:
            assert finding.step == step and finding.detector == detector.kind
            found[step] = finding.value
    return found


def roundtrip(detector: Detector) -> Detector:
    return Detector.restore(json.loads(json.dumps(detector.state(), allow_nan=False)))


def noisy(n: int, seed: int = 0, level: float = 2.0, noise: float = 0.05) -> list[float]:
    rng = random.Random(seed)
    return [level * (1 + rng.gauss(0, noise)) for _ in range(n)]


def test_nonfinite_fires_on_every_nan_and_inf() -> None:
    found = run(NonFinite(), [1.0, math.nan, 2.0, math.inf, -math.inf])
    assert list(found) == [1, 3, 4]
    assert NonFinite().update(0, math.nan).severity == CRITICAL  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("op", "limit", "fires"),
    [(">", 1e3, [2]), (">=", 5.0, [1, 2]), ("<", 1.0, [0]), ("<=", 5.0, [0, 1])],
)
def test_threshold(op: str, limit: float, fires: list[int]) -> None:
    assert list(run(Threshold(op, limit), [0.5, 5.0, 2e3, math.nan, math.inf])) == fires


@pytest.mark.parametrize(
    ("args", "match"), [(("==", 1.0), "op"), ((">", math.nan), "finite"), ((">", 1.0, "loud"), "severity")]
)
def test_threshold_refuses_bad_rules(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Threshold(*args)  # type: ignore[arg-type]


def test_overflow_streak() -> None:
    d = OverflowRate(streak=3)
    assert d.update(10, 1.0) is None and d.update(11, 1.0) is None
    finding = d.update(12, 1.0)
    assert finding is not None and finding.severity == CRITICAL and "3 overflow steps in a row" in finding.message
    assert d.update(14, 1.0) is None  # a gap ends the streak


def test_overflow_rate_over_a_window() -> None:
    d = OverflowRate(streak=3, rate=0.01, window=1000)
    found = {}
    for step in range(0, 2000, 90):  # one overflow every 90 steps: 11-12 per 1000 steps, > 1 %
        finding = d.update(step, 1.0)
        if finding is not None:
            found[step] = finding
    assert found and min(found) >= 999  # nothing before a full window
    assert all(f.severity == WARNING and f.value > 0.01 for f in found.values())
    sparse = OverflowRate(window=1000)
    assert not any(sparse.update(step, 1.0) for step in range(0, 5000, 200))  # 0.5 %: fine


def test_robust_spike_fires_on_spikes_only_after_warm_up() -> None:
    values = noisy(600)
    values[10] = 50.0  # during warm-up: no baseline yet
    values[300] = 8.0  # 4x the level
    values[301] = 9.0  # a second bad step right after: the first did not enter the baseline
    values[450] = 2.3  # +15 % with 5 % noise: about 2 robust deviations, no alarm
    found = run(RobustSpike(), values)
    assert list(found) == [300, 301]


def test_a_run_of_bad_steps_never_becomes_the_baseline() -> None:
    values = noisy(600)
    values[300:420] = [8.0] * 120  # more than half the window: accepted, they would be the new median
    assert list(run(RobustSpike(window=200), values)) == list(range(300, 420))


def test_robust_spike_ignores_level_shifts_and_slow_drift() -> None:
    up, down = noisy(400, seed=1, level=2.2), noisy(400, seed=2, level=1.5)
    values = noisy(400) + up + down + [1.5 * (1 + 0.0005 * i) for i in range(400)]
    assert run(RobustSpike(), values) == {}


def test_a_restored_detector_continues_identically() -> None:
    values = noisy(500, seed=3)
    values[250] = 20.0
    values[420] = math.nan
    for make in (RobustSpike, lambda: OverflowRate(window=100), NonFinite, lambda: Threshold(">", 2.1)):
        whole = run(make(), values)
        first = make()
        part = run(first, values[:200])
        part.update(run(roundtrip(first), values[200:], start=200))
        assert part == pytest.approx(whole, nan_ok=True), make
    assert 250 in run(RobustSpike(), values)


def test_restore_refuses_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="unknown detector kind"):
        Detector.restore({"kind": "oracle"})


def test_gross_magnitude_uses_the_early_maximum() -> None:
    values = [100.0] * 5 + noisy(200, seed=4, level=3.0)  # a huge first steps' loss is skipped
    values[150] = 29.0  # under 10x the early max (~3.5)
    values[180] = 80.0
    found = run(GrossMagnitude(factor=10, reference=100, skip=5), values)
    assert list(found) == [180]


def test_divergence_needs_a_sustained_rise() -> None:
    steady = noisy(300, seed=5)
    blip = steady[:250] + [4.0] * 8 + steady[258:]  # 8 bad steps: a spike, not a divergence
    assert run(Divergence(), blip) == {}
    rising = steady + [2.0 * (1 + 0.02 * i) for i in range(100)]  # +2 % a step
    found = run(Divergence(), rising)
    assert found and 300 < min(found) < 340


def test_the_other_detectors_restore_too() -> None:
    values = noisy(500, seed=6) + [2.0 * (1 + 0.03 * i) for i in range(60)] + [50.0]
    for make in (GrossMagnitude, Divergence):
        whole = run(make(), values)
        first = make()
        part = run(first, values[:300])
        part.update(run(roundtrip(first), values[300:], start=300))
        assert part == whole and whole, make


def test_threshold_patience_needs_a_streak() -> None:
    dead = Threshold(">", 0.9, patience=3)  # e.g. act/<module>/zero_frac: dead units
    assert list(run(dead, [0.95, 0.95, 0.5, 0.95, 0.96, 0.97, 0.99, math.nan, 0.99])) == [5, 6]


def test_band_flags_ratios_outside_their_orders_of_magnitude() -> None:
    ratio = Band(1e-3, 1e3, patience=2)  # first/last layer gradient-norm ratio
    values = [1.0, 5e-4, 2.0, 4e-4, 3e-4, 1e-4, 10.0, 2e3, 3e3]
    found = {s: f for s, f in ((s, ratio.update(s, v)) for s, v in enumerate(values)) if f is not None}
    assert list(found) == [4, 5, 8]
    assert "below" in found[4].message and found[8].baseline == 1e3
    with pytest.raises(ValueError, match="low < high"):
        Band(1.0, 1.0)


def test_the_streak_detectors_restore_mid_streak() -> None:
    values = [0.0, 5.0, 5.0, 0.0, 5.0, 5.0, 5.0, 5.0]
    for make in (lambda: Threshold(">", 1.0, patience=3), lambda: Band(-1.0, 1.0, patience=3)):
        whole = run(make(), values)
        first = make()
        part = run(first, values[:5])
        part.update(run(roundtrip(first), values[5:], start=5))
        assert part == whole == {6: 5.0, 7: 5.0}


def finding(step: int, detector: str = "robust_spike") -> Finding:
    return Finding(detector, step, 1.0, WARNING, "")


def test_mad_selection_matches_sorting() -> None:
    import random

    from trimtab.detectors.series import _mad, _median

    rng = random.Random(3)
    for n in [*range(1, 40), 199, 200, 201]:
        for _ in range(20):
            values = sorted(rng.choice([rng.gauss(0, 1), float(rng.randint(-3, 3))]) for _ in range(n))
            median = _median(values)
            assert _mad(values, median) == pytest.approx(_median(sorted(abs(v - median) for v in values)), abs=1e-12)


def test_divergence_windows_match_a_recomputation() -> None:
    import random

    from trimtab.detectors.series import _median

    rng = random.Random(5)
    d = Divergence(ratio=1.1, short=5, long=20, patience=1)
    seen: list[float] = []
    for step in range(200):
        v = rng.uniform(0.5, 1.5) * (1 + step / 50)
        found = d.update(step, v)
        seen.append(v)
        window = seen[-25:]
        if len(window) == 25:
            expect = _median(sorted(window[-5:])) / _median(sorted(window[:-5])) > 1.1
            assert (found is not None) == expect
