"""The remedy hints an alert carries, from the stability literature (docs/alerts.md has the
table): by key prefix first, then by detector."""

from __future__ import annotations

REMEDY_NONFINITE = (
    "Skip the batch (the nonfinite event names where the NaN was born); if it recurs, lower the LR, "
    "check the data, or train in bf16 instead of fp16."
)
REMEDY_SPIKE = "Skip the offending batch, clip gradients, lower the LR or lengthen the warm-up."
# What a spike alert says once its findings show the value jumped and stayed up (PERSISTENT_COUNT
# findings): one bad batch passes, this does not.
REMEDY_PERSISTENT_JUMP = (
    "The value jumped and stayed up, so skipping a batch will not help. If a weight norm jumped at "
    "the same step (weight_norm/*), the weights were corrupted (a bad write, a checkpoint mix-up, an "
    "update that should have been rejected): roll back to a snapshot or checkpoint from before the jump. "
    "If the weights look normal, check what changed in the data or the LR at that step."
)
PERSISTENT_COUNT = 8
# The hint of an info alert: a loss rule's finding the gradients did not confirm (a level shift).
REMEDY_SHIFT = (
    "Nothing looks wrong: the loss moved to a new level while the gradients stayed normal, as after "
    "a change of data mixture, a curriculum stage, a new sequence length or an LR restart. No action "
    "is needed if such a change happened at this step; if nothing changed, check the data pipeline."
)
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
REMEDY_GAVE_UP = (
    "The autopilot could not recover the run (it rolled back and cut the LR, and the trouble came back) "
    "and paused it: look at the data and the LR schedule around the first alert, then resume, roll back "
    "or stop it from the control panel."
)
REMEDY_THRESHOLD = "A watched value crossed its limit: check the run's recent changes (data, LR, batch size)."

_BY_KEY = (
    ("autopilot/gave_up", REMEDY_GAVE_UP),
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
