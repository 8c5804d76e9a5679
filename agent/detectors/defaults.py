"""The shipped rules, which apply to every project with no configuration (docs/alerts.md has
the table). Their thresholds are the ones ``benchmarks/detectors.py`` scores; change them
there first."""

from __future__ import annotations

from typing import Any

from trimtab.detectors.rules import RuleSpec, parse_rule

# A loss spike counts when the gradient norm spikes too, within 10 steps. The loss threshold
# (25 robust deviations) sits between the harmless data switch (at most 17 in the harness)
# and every harmful loss spike there (32 and up); see benchmarks/RESULTS.md.
_SPIKE_CONFIRM: dict[str, Any] = {
    "key": "grad_norm/total",
    "detector": "robust_spike",
    "params": {"z": 6.0},
    "window": 10,
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
    # a harmless data switch holds the loss up to 1.38x for a while in the harness
    {"name": "loss-divergence", "key": "loss", "detector": "divergence", "params": {"ratio": 1.5}},
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
