"""Shift versus harm: seeded CPU runs of a small GPT trained the way the popular public
scripts train one, where something changes at a known step. Five changes are harmless (the
data or the schedule moved on; training is fine) and five are harmful. None of them is a
variant of ``detector_scenarios.py`` (those train an MLP); they were written for issue 13
to check that trimtab tells a shift from harm on runs it was not tuned on.

The script (``train``): a 2-layer pre-LN GPT calling ``F.scaled_dot_product_attention``,
AdamW (weight decay 0.1, betas 0.9/0.95), a warm-up + cosine LR assigned by hand to every
param group each iteration, gradient clipping at 1.0, 16 sequences of 32 tokens a step,
600 steps; the tokens come from fixed random Markov chains ("sources").

Harmless, at a seeded step between 250 and 400:

* ``mixture_switch``: the data becomes a 50/50 mixture of the old source and a new one;
* ``domain_switch``: the data becomes a new source entirely;
* ``curriculum_stage``: a harder stage: the same source with higher-entropy transitions;
* ``seq_len_doubling``: sequences of 64 tokens (8 a step: the same tokens per step), so
  positions the model never saw come into use;
* ``lr_warm_restart``: the LR schedule restarts (warm-up to its peak, then cosine again).

Harmful, at a seeded onset between 250 and 400:

* ``lr_blowup``: from the onset the script's LR formula is 200x too high (a config error),
  for good;
* ``lr_burst``: 5 steps at 100x the LR (a resume that skipped its warm-up), then back;
* ``weight_corruption``: the attention projections of block 0 get noise 20x their spread
  (a bad checkpoint shard);
* ``nan_weights``: one MLP weight becomes Inf: every later loss is NaN;
* ``output_corruption``: the output layer gets noise 10x its spread (a bad write).

A fault counts as harmful because it is: ``shifts.py`` prints each one's final loss against
the healthy run of the same seed. (Two candidates were dropped for doing no lasting harm in
this script, where clipping and AdamW absorb them: an LR 50x too high and gradients never
zeroed.)

Plus ``healthy`` (nothing changes). ``SHIFT_KEYS``/``FAULT_KEYS`` list them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, SEQ, BATCH, STEPS = 48, 32, 16, 600
PEAK_LR, WARMUP, MIN_LR = 3e-3, 40, 3e-4

SHIFT_KEYS = ("mixture_switch", "domain_switch", "curriculum_stage", "seq_len_doubling", "lr_warm_restart")
FAULT_KEYS = ("lr_blowup", "lr_burst", "weight_corruption", "nan_weights", "output_corruption")
SCENARIOS = ("healthy", *SHIFT_KEYS, *FAULT_KEYS)


def change_step(seed: int) -> int:
    """The seeded step of the shift or fault (250-399)."""
    return int(torch.randint(250, 400, (1,), generator=torch.Generator().manual_seed(7_000 + seed)))


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).split(d, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.proj(y.transpose(1, 2).reshape(b, t, d))
        return out


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        out: torch.Tensor = x + self.out(F.gelu(self.fc(self.ln2(x))))
        return out


class GPT(nn.Module):
    def __init__(self, d: int = 48, layers: int = 2, heads: int = 4, max_len: int = 2 * SEQ) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            h = block(h)
        logits: torch.Tensor = self.head(self.ln(h))
        return logits


class Source:
    """Sequences from a fixed random Markov chain; ``sharpness`` sets how predictable."""

    def __init__(self, seed: int, sharpness: float, g: torch.Generator) -> None:
        table_g = torch.Generator().manual_seed(seed)
        self.table = (torch.randn(VOCAB, VOCAB, generator=table_g) * sharpness).softmax(-1)
        self.g = g

    def batch(self, n: int, length: int) -> torch.Tensor:
        seqs = torch.empty(n, length + 1, dtype=torch.long)
        seqs[:, 0] = torch.randint(0, VOCAB, (n,), generator=self.g)
        for t in range(length):
            seqs[:, t + 1] = torch.multinomial(self.table[seqs[:, t]], 1, generator=self.g)[:, 0]
        return seqs


def cosine_lr(it: int, start: int = 0, peak: float = PEAK_LR) -> float:
    """nanoGPT's schedule: linear warm-up, then cosine down to MIN_LR at STEPS."""
    it -= start
    if it < WARMUP:
        return peak * (it + 1) / WARMUP
    ratio = min(1.0, (it - WARMUP) / max(1, STEPS - start - WARMUP))
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - MIN_LR)


@dataclass
class Plan:
    """What the script does at a step: which data, which LR, what breaks."""

    scenario: str
    seed: int
    at: int = field(init=False)

    def __post_init__(self) -> None:
        self.at = change_step(self.seed)
        g = torch.Generator().manual_seed(40_000 + self.seed)
        self.old = Source(50_000 + self.seed, 2.5, g)
        self.new = Source(60_000 + self.seed, 2.5, g)
        self.hard = Source(50_000 + self.seed, 1.2, g)  # the old chain, flatter: more entropy

    @property
    def harmful(self) -> bool:
        return self.scenario in FAULT_KEYS

    def data(self, step: int) -> torch.Tensor:
        s, after = self.scenario, step >= self.at
        if after and s == "mixture_switch":
            return torch.cat([self.old.batch(BATCH // 2, SEQ), self.new.batch(BATCH // 2, SEQ)])
        if after and s == "domain_switch":
            return self.new.batch(BATCH, SEQ)
        if after and s == "curriculum_stage":
            return self.hard.batch(BATCH, SEQ)
        if after and s == "seq_len_doubling":
            return self.old.batch(BATCH // 2, 2 * SEQ)
        return self.old.batch(BATCH, SEQ)

    def lr(self, step: int) -> float:
        s = self.scenario
        if s == "lr_warm_restart" and step >= self.at:
            return cosine_lr(step, start=self.at)
        lr = cosine_lr(step)
        if s == "lr_blowup" and step >= self.at:
            return lr * 200
        if s == "lr_burst" and self.at <= step < self.at + 5:
            return lr * 100
        return lr

    def break_things(self, step: int, model: GPT) -> None:
        """Faults written into the weights (at the onset, before its forward pass)."""
        if step != self.at:
            return
        block0 = model.blocks[0]
        assert isinstance(block0, Block)
        with torch.no_grad():
            if self.scenario == "weight_corruption":
                w = block0.attn.qkv.weight
                w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(self.seed)) * 20 * w.std())
            if self.scenario == "nan_weights":
                block0.fc.weight[0, 0] = math.inf
            if self.scenario == "output_corruption":
                w = model.head.weight
                w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(self.seed)) * 10 * w.std())


StepHook = Callable[[int, torch.Tensor, GPT, torch.optim.Optimizer], None]


def train(plan: Plan, on_backward: StepHook, should_stop: Callable[[], bool] = lambda: False) -> GPT:
    """The training script. ``on_backward(step, loss, model, opt)`` runs after backward and
    before clipping and the optimizer step: where a user puts ``run.step(loss)``."""
    torch.manual_seed(plan.seed)
    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95))
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = plan.lr(step)
        plan.break_things(step, model)
        batch = plan.data(step)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        loss.backward()  # type: ignore[no-untyped-call]
        on_backward(step, loss, model, opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if should_stop():
            break
    return model
