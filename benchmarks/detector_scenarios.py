"""Seeded CPU training runs that really go wrong, recorded through ``run.watch``'s own
``Watcher``: the series the detectors see are the ones a real run would send.

Every scenario is a small model trained with torch; a fault is injected (or arises) at a
known step, the ground-truth onset. ``benchmarks/detectors.py`` scores detectors on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trimtab.watch import Watcher, WatchOptions

SAMPLE_EVERY = 10  # sampled keys (activations, update ratios) every 10 steps, not the default 100


@dataclass
class Trace:
    scenario: str
    seed: int
    steps: int
    onset: int | None  # first step of the harmful episode; None: a healthy run
    shift: int | None = None  # a harmless data switch (healthy runs)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def points(self) -> list[tuple[int, str, float]]:
        """Every point, in step order (keys within a step in a fixed order)."""
        out = [(s, k, v) for k, pts in self.series.items() for s, v in pts]
        out.sort(key=lambda p: (p[0], p[1]))
        return out


class _Recorder:
    rank = 0

    def __init__(self) -> None:
        self.series: dict[str, list[tuple[int, float]]] = {}

    def emit_scalars(self, step: int, wall: float, record: dict[str, float]) -> None:
        for key, value in record.items():
            if (
                key.startswith(("grad_norm/", "weight_norm/"))
                and key != "grad_norm/total"
                and key != "grad_norm/depth_ratio"
            ):
                continue  # per-parameter norms: no default rule reads them, and they are many
            self.series.setdefault(key, []).append((step, float(value)))

    def emit_histogram(self, *args: Any) -> None:
        pass

    def emit_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def warn_once(self, topic: str, message: str) -> None:
        pass


def _watcher(sink: _Recorder, model: nn.Module, opt: torch.optim.Optimizer, scaler: Any = None) -> Watcher:
    opts = WatchOptions(sample_every=SAMPLE_EVERY, histograms=False, replay_on_nonfinite=False, overhead_budget=None)
    return Watcher(sink, model, opt, None, scaler, opts)


# ---------------------------------------------------------------------------- the MLP task
IN, CLASSES = 32, 10


class Teacher:
    """Labels from a fixed random 2-layer network: a learnable, noise-free task."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(10_000 + seed)
        self.g = g
        self.w1 = torch.randn(IN, 64, generator=g) / math.sqrt(IN)
        self.w2 = torch.randn(64, CLASSES, generator=g) / 8

    def batch(self, n: int = 64, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, IN, generator=self.g)
        y = (torch.tanh(x @ self.w1) @ self.w2).argmax(1)
        return x + shift, y


def mlp(seed: int, width: int = 128) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, CLASSES))


def onset_step(seed: int, steps: int) -> int:
    return int(torch.randint(steps // 2 - 50, steps // 2 + 100, (1,), generator=torch.Generator().manual_seed(seed)))


def run_mlp(scenario: str, seed: int, steps: int = 600) -> Trace:
    teacher, model = Teacher(seed), mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fp16 = scenario == "fp16_overflow"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if fp16 else None
    sink = _Recorder()
    watcher = _watcher(sink, model, opt, scaler)
    onset = None if scenario in ("healthy", "data_shift") else onset_step(seed, steps)
    shift = onset_step(seed, steps) if scenario == "data_shift" else None
    at = onset if onset is not None else steps + 1  # the fault's step (never, when healthy)
    for step in range(steps):
        after = step >= at
        x, y = teacher.batch(shift=0.6 if shift is not None and step >= shift else 0.0)
        if scenario == "high_lr" and step == at:
            for group in opt.param_groups:
                group["lr"] *= 100
        if scenario == "corrupted_batch" and after and step < at + 1 + seed % 3:
            x = x * 1000  # a few batches of garbage scale (a broken decode, a unit mix-up)
        if scenario == "label_corruption" and after and step < at + 40:
            y = torch.randint(0, CLASSES, y.shape, generator=teacher.g)  # shuffled labels
        if scenario == "relu_kill" and after and step < at + 3:
            for group in opt.param_groups:
                group["lr"] = 0.3  # a short burst of huge steps pushes units dead
        if scenario == "relu_kill" and step == at + 3:
            for group in opt.param_groups:
                group["lr"] = 1e-3
        if fp16 and step == at:
            runaway = model[2]
            assert isinstance(runaway, nn.Linear)
            with torch.no_grad():  # activations grow out of fp16's range (a runaway layer)
                runaway.weight.mul_(300.0)
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        else:
            loss.backward()  # type: ignore[no-untyped-call]
        watcher.step(loss, step, None, None)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    watcher.close()
    return Trace(scenario, seed, steps, onset, shift, sink.series)


def run_deep_sigmoid(scenario: str, seed: int, steps: int = 400) -> Trace:
    """A 12-layer sigmoid MLP: gradients vanish across depth from the first step."""
    teacher = Teacher(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(IN, IN), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(IN, CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = _Recorder()
    watcher = _watcher(sink, model, opt)
    for step in range(steps):
        x, y = teacher.batch()
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        watcher.step(loss, step, None, None)
        opt.step()
        opt.zero_grad(set_to_none=True)
    watcher.close()
    return Trace(scenario, seed, steps, 0, None, sink.series)


# ---------------------------------------------------------------------------- the transformer
VOCAB, SEQ = 64, 24


class Block(nn.Module):
    """Pre-LN attention block without qk-norm; keeps the largest attention logit it saw."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.max_logit = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, -1))
        att = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        self.max_logit = att.detach().abs().amax()
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        y = att.masked_fill(mask, float("-inf")).softmax(-1) @ v
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class TinyGPT(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        logits: torch.Tensor = self.head(self.ln(h))
        return logits


def _markov_data(seed: int, n: int) -> torch.Tensor:
    """n sequences of SEQ + 1 tokens from a fixed random Markov chain."""
    g = torch.Generator().manual_seed(20_000 + seed)
    table = (torch.randn(VOCAB, VOCAB, generator=g) * 2).softmax(-1)
    seqs = torch.empty(n, SEQ + 1, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(SEQ):
        seqs[:, t + 1] = torch.multinomial(table[seqs[:, t]], 1, generator=g)[:, 0]
    return seqs


def run_attention(scenario: str, seed: int, steps: int = 400) -> Trace:
    """A tiny GPT without qk-norm; at the onset its LR goes from 3e-3 to 0.1 (a schedule
    mistake) and attention logits grow. The user logs ``attn/max_logit`` themselves."""
    torch.manual_seed(seed)
    model = TinyGPT()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = _markov_data(seed, steps * 16)
    sink = _Recorder()
    watcher = _watcher(sink, model, opt)
    onset = onset_step(seed, steps)
    for step in range(steps):
        if step == onset:
            for group in opt.param_groups:
                group["lr"] = 0.1
        batch = data[step * 16 : (step + 1) * 16]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        loss.backward()  # type: ignore[no-untyped-call]
        watcher.step(loss, step, None, None)
        biggest = max(float(b.max_logit) for b in model.blocks)  # type: ignore[arg-type]
        sink.series.setdefault("attn/max_logit", []).append((step, biggest))
        opt.step()
        opt.zero_grad(set_to_none=True)
    watcher.close()
    return Trace(scenario, seed, steps, onset, None, sink.series)


SCENARIOS: dict[str, tuple[Callable[[str, int], Trace], bool, str]] = {
    # name: (runner, harmful, what happens)
    "healthy": (run_mlp, False, "3-layer ReLU MLP, Adam 1e-3, nothing goes wrong"),
    "data_shift": (run_mlp, False, "harmless switch: inputs shift by +0.6 mid-run, labels stay learnable"),
    "high_lr": (run_mlp, True, "LR x100 from the onset on"),
    "corrupted_batch": (run_mlp, True, "1-3 batches with inputs x1000"),
    "label_corruption": (run_mlp, True, "40 batches with random labels"),
    "fp16_overflow": (run_mlp, True, "fp16 autocast + GradScaler; a layer's weights x300 overflow fp16"),
    "relu_kill": (run_mlp, True, "3 steps at LR 0.3 kill ReLU units"),
    "deep_sigmoid": (run_deep_sigmoid, True, "12-layer sigmoid MLP: gradients vanish from step 0"),
    "attention_logits": (run_attention, True, "tiny GPT without qk-norm, LR 3e-3 -> 0.1 at the onset"),
}
