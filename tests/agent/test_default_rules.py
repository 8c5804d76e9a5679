"""The shipped rules on real (small, seeded) torch runs from the detector harness: they catch
injected faults at the onset and stay silent on a healthy run and a harmless data switch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

from detector_scenarios import SCENARIOS
from detectors import score, trimtab_method
from shifts import findings


@pytest.mark.parametrize("scenario", ["high_lr", "corrupted_batch", "deep_sigmoid"])
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


def test_random_labels_with_healthy_gradients_are_annotated_not_paged() -> None:
    """The known cost of shift versus harm: 40 batches of shuffled labels raise the loss while
    the gradients stay normal, so the shipped rules call it a shift (info), not a page."""
    runner, _, _ = SCENARIOS["label_corruption"]
    trace = runner("label_corruption", 0)
    assert trimtab_method(trace) == []
    infos = [f for f in findings(trace.series) if f.severity == "info"]
    assert infos and trace.onset is not None and min(f.step for f in infos) >= trace.onset
