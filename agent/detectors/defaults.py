"""The shipped rules, which apply to every project with no configuration (docs/alerts.md has
the table). Their thresholds are the ones ``benchmarks/detectors.py`` scores; change them
there first."""

from __future__ import annotations

from typing import Any

from trimtab.detectors.rules import RuleSpec, parse_rule

# Shift versus harm (issue 13; benchmarks/shifts.py, seeds 0-4): the loss rules page only
# with evidence from the gradients. A loss spike counts when the gradient norm jumps too, to
# 5x its median within 10 steps (harmless data and schedule changes moved it 1.7-5.7x in the
# harness, the harmful faults 4.6-26x: they overlap); a sustained rise counts when the
# gradient norm's median over 50 steps doubles too, within 50 steps of it (harmless: at most
# 1.42x; corrupted weights 3.3x and more). The loss thresholds (25 robust deviations, 1.5x)
# are those of benchmarks/detectors.py. Without that evidence the finding is `info`.
_SPIKE_CONFIRM: dict[str, Any] = {
    "key": "grad_norm/total",
    "detector": "robust_spike",
    "params": {"z": 6.0, "min_ratio": 5.0},
    "window": 10,
}
_RISE_CONFIRM: dict[str, Any] = {
    "key": "grad_norm/total",
    "detector": "divergence",
    "params": {"ratio": 2.0, "short": 50},
    "window": 50,
}

_DEFAULTS: tuple[dict[str, Any], ...] = (
    {"name": "nonfinite-loss", "key": "loss", "detector": "nonfinite"},
    {
        "name": "autopilot-acted",
        "key": "autopilot/actions",
        "detector": "threshold",
        "params": {"op": ">", "limit": 0.0},
    },
    {
        "name": "autopilot-gave-up",
        "key": "autopilot/gave_up",
        "detector": "threshold",
        "params": {"op": ">", "limit": 0.0},
        "severity": "critical",
    },
    {"name": "nonfinite-grad-norm", "key": "grad_norm/total", "detector": "nonfinite"},
    {
        "name": "loss-spike",
        "key": "loss",
        "detector": "robust_spike",
        "params": {"z": 25.0},
        "severity": "critical",
        "confirm": _SPIKE_CONFIRM,
    },
    {"name": "loss-gross", "key": "loss", "detector": "gross_magnitude"},
    {"name": "grad-norm-gross", "key": "grad_norm/total", "detector": "gross_magnitude"},
    {
        "name": "loss-divergence",
        "key": "loss",
        "detector": "divergence",
        "params": {"ratio": 1.5},
        "confirm": _RISE_CONFIRM,
    },
    {"name": "loss-scale-collapse", "key": "amp_overflow", "detector": "overflow_rate"},
    {
        "name": "loss-scale-below-one",
        "key": "loss_scale",
        "detector": "threshold",
        "params": {"op": "<", "limit": 1.0},
        "severity": "critical",
    },
    {
        "name": "dead-units",
        "key": "act/*zero_frac",  # a module's output zeros, and a layer's input (behind a functional F.relu)
        "detector": "threshold",
        "params": {"op": ">", "limit": 0.95, "patience": 2},
    },
    {
        "name": "vanishing-gradients",
        "key": "grad_norm/depth_ratio",
        "detector": "band",
        "params": {"low": 1e-4, "high": 1e4, "patience": 20},
    },
    {
        "name": "update-ratio",
        "key": "update_ratio/*weight",  # not biases: zero-initialised, their early ratios are large
        "detector": "threshold",
        "params": {"op": ">", "limit": 0.1, "patience": 2},
    },
    {
        "name": "attention-logits",
        "key": "attn/*max_logit*",
        "detector": "threshold",
        "params": {"op": ">", "limit": 1000.0},
        "severity": "critical",
    },
)

DEFAULT_RULES: tuple[RuleSpec, ...] = tuple(parse_rule(body) for body in _DEFAULTS)
