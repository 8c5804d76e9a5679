"""The shipped rules, which apply to every project with no configuration, and the remedy
hints an alert carries (docs/alerts.md has the table). Their thresholds are the ones
``benchmarks/detectors.py`` scores; change them there first."""

from __future__ import annotations

from typing import Any

from trimtab.detectors.rules import RuleSpec, parse_rule

REMEDY_NONFINITE = (
    "Skip the batch (the nonfinite event names where the NaN was born); if it recurs, lower the LR, "
    "check the data, or train in bf16 instead of fp16."
)
REMEDY_SPIKE = "Skip the offending batch, clip gradients, lower the LR or lengthen the warm-up."
REMEDY_DIVERGENCE = "Roll back to a checkpoint before the rise and resume with a lower LR (or a longer warm-up)."
REMEDY_OVERFLOW = (
    "fp16 is overflowing: switch to bf16, or tune GradScaler (lower init_scale, longer growth_interval) "
    "and look for layers whose activations grow."
)
REMEDY_DEAD = "Units have died: lower the LR, check the initialisation, or use a leaky activation."
REMEDY_VANISHING = "Gradients shrink or grow across depth: add normalisation, scale residual branches, revisit init."
REMEDY_UPDATE = "Updates are too large for the weights: lower the LR for these parameters, or add weight decay."
REMEDY_ATTENTION = "Attention logits are growing: add qk-layernorm or a z-loss, and lower the LR."
REMEDY_AUTOPILOT = (
    "The autopilot acted on its own (skipped updates, cut the LR or rolled back): check the run's "
    "commands with source=autopilot, and the alert that explains why."
)
REMEDY_THRESHOLD = "A watched value crossed its limit: check the run's recent changes (data, LR, batch size)."

_BY_KEY = (
    ("autopilot/", REMEDY_AUTOPILOT),
    ("attn", REMEDY_ATTENTION),
    ("act/", REMEDY_DEAD),
    ("update_ratio/", REMEDY_UPDATE),
    ("grad_norm/depth_ratio", REMEDY_VANISHING),
    ("loss_scale", REMEDY_OVERFLOW),
    ("amp_overflow", REMEDY_OVERFLOW),
)
_BY_DETECTOR = {
    "nonfinite": REMEDY_NONFINITE,
    "robust_spike": REMEDY_SPIKE,
    "gross_magnitude": REMEDY_SPIKE,
    "divergence": REMEDY_DIVERGENCE,
    "overflow_rate": REMEDY_OVERFLOW,
}


def remedy_for(detector: str, key: str) -> str:
    """The built-in hint for a detector on a key (the key is more telling when it is known)."""
    if detector == "nonfinite":
        return REMEDY_NONFINITE
    for prefix, remedy in _BY_KEY:
        if key.startswith(prefix):
            return remedy
    return _BY_DETECTOR.get(detector, REMEDY_THRESHOLD)


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
        "key": "act/*/zero_frac",
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
