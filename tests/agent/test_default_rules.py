"""The shipped rules on real (small, seeded) torch runs from the detector harness: they catch
injected faults at the onset and stay silent on a healthy run and a harmless data switch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

from detector_scenarios import SCENARIOS
from detectors import score, trimtab_method


@pytest.mark.parametrize("scenario", ["label_corruption", "corrupted_batch", "deep_sigmoid"])
def test_default_rules_catch_a_fault(scenario: str) -> None:
    runner, harmful, _ = SCENARIOS[scenario]
    trace = runner(scenario, 0)
    result = score(trace, trimtab_method(trace))
    assert harmful and result["detected"] and result["false"] == 0, result


@pytest.mark.parametrize("scenario", ["healthy", "data_shift"])
def test_default_rules_stay_silent(scenario: str) -> None:
    runner, harmful, _ = SCENARIOS[scenario]
    trace = runner(scenario, 4)  # seed 4's switch is the sharpest of the tuning seeds
    assert not harmful and trimtab_method(trace) == []
