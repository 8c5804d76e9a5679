"""Instability detectors and the rules that put them on keys: pure Python (no torch, no
numpy), stateful and serialisable, shared by the server's alert engine and the agent.

- ``series``: one detector per series, ``update(step, value) -> Finding | None``.
- ``rules``: ``parse_rule`` validates a rule body; ``RuleEvaluator`` runs one rule on one key.
- ``defaults``: the shipped rules and remedy hints.
"""

from trimtab.detectors.defaults import DEFAULT_RULES
from trimtab.detectors.remedies import remedy_for
from trimtab.detectors.rules import (
    ConfirmSpec,
    RuleError,
    RuleEvaluator,
    RuleSpec,
    detector_kinds,
    make_detector,
    parse_rule,
)
from trimtab.detectors.series import (
    CRITICAL,
    INFO,
    SEVERITY_RANK,
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

__all__ = [
    "CRITICAL",
    "DEFAULT_RULES",
    "INFO",
    "SEVERITY_RANK",
    "WARNING",
    "Band",
    "ConfirmSpec",
    "Detector",
    "Divergence",
    "Finding",
    "GrossMagnitude",
    "NonFinite",
    "OverflowRate",
    "RobustSpike",
    "RuleError",
    "RuleEvaluator",
    "RuleSpec",
    "Threshold",
    "detector_kinds",
    "make_detector",
    "parse_rule",
    "remedy_for",
]
