"""Shift versus harm on real (small, seeded) torch runs from ``benchmarks/shift_scenarios.py``:
a nanoGPT-style script whose data switches domain gets info annotations only and no
autopilot action; the same script with corrupted weights pages."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

from shift_scenarios import Plan
from shifts import autopilot_actions, findings, record


def test_a_domain_switch_is_annotated_not_paged_and_the_autopilot_leaves_it_alone(tmp_path: Path) -> None:
    plan = Plan("domain_switch", 0)
    found = findings(record(plan))
    assert found and {f.severity for f in found} == {"info"}
    assert min(f.step for f in found) >= plan.at
    assert autopilot_actions(plan, str(tmp_path)) == []


def test_corrupted_weights_page() -> None:
    plan = Plan("weight_corruption", 0)
    pages = [f for f in findings(record(plan)) if f.severity != "info"]
    assert pages and plan.at <= min(f.step for f in pages) < plan.at + 150
