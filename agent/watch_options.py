"""The options of ``run.watch``: cadence and switches, checked when ``watch`` is called."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass
class WatchOptions:
    """Cadence and switches of ``run.watch``; every one is a keyword argument of it."""

    sample_every: int = 100  # weight norms, update ratios, histograms, activations
    histograms: bool = True
    activations: bool = True
    update_ratio: bool = True
    param_grad_norms: bool = True  # one grad_norm/<param> per parameter, every step
    bins: int = 64
    overhead_budget: float | None = 0.02  # fraction of step time; past it, sample less often (None: never)
    batch_size: int | None = None  # samples per optimizer step, for throughput
    tokens_per_step: int | None = None  # tokens per optimizer step, for throughput
    all_ranks_histograms: bool = False  # by default only rank 0 sends histograms
    activation_modules: Callable[[str, nn.Module], bool] | None = None  # default: leaf modules
    attention_logits: bool = True  # attn/<module>/max_logit on sampled steps (attention.py)
    replay_on_nonfinite: bool = True

    def check(self) -> None:
        for name in ("sample_every", "bins"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"run.watch: {name} must be a positive int, got {value!r}")
        if self.bins > 4096:
            raise ValueError(f"run.watch: bins must be at most 4096, got {self.bins}")
        budget = self.overhead_budget
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1
        ):
            raise ValueError(f"run.watch: overhead_budget is a fraction in (0, 1] or None, got {budget!r}")
        for name in ("batch_size", "tokens_per_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"run.watch: {name} must be a positive int or None, got {value!r}")
