"""What ``run.watch`` + ``run.step`` cost a training loop, measured side by side.

A small GPT (4 layers, d_model 256, 4 heads, seq 128, batch 8, vocab 8192) trains on random
tokens. Three modes take turns in blocks of 10 steps in one process, on one model:

* ``off``: no agent;
* ``every-step``: the every-step metrics only (loss, grad norms per parameter, lr, timing);
* ``default``: the default cadence: also weight norms, update ratios, weight/gradient
  histograms and activation statistics + histograms every 100 steps.

It prints each mode's median step time and its ratio to ``off`` (the every-step cost), the
mean step time ratio (the amortised cost, sampled steps included), the median time spent
inside ``run.step`` itself (a direct, low-noise measure of the training-thread cost) and
the extra time of a sampled step, then times its histograms against ``torch.histc``.
Targets: every-step <= 1 %, default cadence <= 2 % (amortised). On a shared 2-core
machine the step-time ratios carry about +-1 % of noise.

The agent points at a closed port with a disk spool, so the sender thread does its whole
job (batching, encoding, spooling) but no server competes for the CPU.

    .venv/bin/python benchmarks/agent_overhead.py [--steps 400] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import trimtab

VOCAB, D_MODEL, HEADS, LAYERS, SEQ, BATCH = 8192, 256, 4, 4, 128, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.fc = nn.Linear(D_MODEL, 4 * D_MODEL)
        self.act = nn.GELU()
        self.out = nn.Linear(4 * D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, D_MODEL // HEADS).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D_MODEL)
        x = x + self.proj(attn)
        out: torch.Tensor = x + self.out(self.act(self.fc(self.ln2(x))))
        return out


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Parameter(torch.zeros(SEQ, D_MODEL))
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.head(self.ln_f(x))
        return out


MODES: dict[str, dict[str, Any] | None] = {
    "off": None,
    "every-step": {"sample_every": 1 << 20, "histograms": False, "activations": False, "update_ratio": False},
    "default": {},
}


def histogram_speed(model: nn.Module, repeats: int = 20) -> None:
    """trimtab's histogram against ``torch.histc`` (given the range) on every weight tensor."""
    from trimtab.histogram import summarize

    weights = [p.detach() for p in model.parameters()]

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    ours = best(lambda: [summarize(w, 64) for w in weights])
    histc = best(lambda: [torch.histc(w, 64, float(w.min()), float(w.max())) for w in weights])
    print(
        f"histograms of all weights: trimtab {ours * 1e3:.1f} ms, torch.histc {histc * 1e3:.1f} ms "
        f"({histc / ours:.1f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="measured steps per mode")
    parser.add_argument("--block", type=int, default=10, help="steps per turn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = GPT().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    n_params = sum(p.numel() for p in model.parameters())
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"model: {n_params / 1e6:.1f} M parameters, {len(list(model.parameters()))} tensors; device: {label}")

    spool = tempfile.mkdtemp(prefix="trimtab-bench-")
    run = trimtab.init(server="http://127.0.0.1:9", spool_dir=spool, replay_orphans=False, name="agent-overhead")

    in_step: dict[str, list[float]] = {m: [] for m in MODES}

    def train_step(mode: str, mode_step: int, watched: bool) -> float:
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()  # type: ignore[no-untyped-call]
        if watched:
            before = time.perf_counter()
            run.step(loss, step=mode_step, batch_size=BATCH, tokens=BATCH * SEQ)
            in_step[mode].append(time.perf_counter() - before)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for i in range(20):  # warm-up: allocator, kernels, first-touch pages
        train_step("off", i, False)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    sampled: list[float] = []
    next_step = dict.fromkeys(MODES, 0)
    turns = math.ceil(args.steps / args.block)
    began = time.perf_counter()
    for turn in range(turns):
        for mode, cadence in MODES.items():
            if cadence is not None:
                run._train_step = next_step[mode] - 1 if next_step[mode] else None
                run.watch(model, opt, **cadence)
            for _ in range(args.block):
                k = next_step[mode]
                elapsed = train_step(mode, k, cadence is not None)
                next_step[mode] = k + 1
                if mode == "default" and k % 100 == 0:
                    sampled.append(elapsed)
                else:
                    times[mode].append(elapsed)
            run.unwatch()
        done = (turn + 1) / turns
        print(f"\r  {done:4.0%} after {time.perf_counter() - began:4.0f} s", end="", flush=True)
    print()
    histogram_speed(model)
    run.finish(timeout=2)  # the server is a closed port: the batches stay in the spool, removed here
    shutil.rmtree(spool, ignore_errors=True)

    base = statistics.median(times["off"])
    base_mean = statistics.fmean(times["off"])
    print(f"{'mode':<12}{'median ms':>11}{'ratio':>9}{'mean ms':>10}{'amortised':>11}{'in run.step ms':>16}")
    for mode in MODES:
        median = statistics.median(times[mode])
        every = 100 if mode == "default" else None
        mean = statistics.fmean(times[mode])
        if every:  # one sampled step per `every` steps
            mean = (mean * (every - 1) + statistics.median(sampled)) / every
        agent = (
            f"{statistics.median(in_step[mode]) * 1e3:.2f} ({statistics.median(in_step[mode]) / base:.2%})"
            if in_step[mode]
            else "-"
        )
        ratios = f"{median / base:>9.4f}{mean * 1e3:>10.2f}{mean / base_mean:>11.4f}"
        print(f"{mode:<12}{median * 1e3:>11.2f}{ratios}{agent:>16}")
    extra = statistics.median(sampled) - base
    print(
        f"sampled step (default cadence): {statistics.median(sampled) * 1e3:.1f} ms, +{extra * 1e3:.1f} ms "
        f"= {extra / base:.1%} of a step, {extra / base / 100:.2%} amortised over 100 steps"
    )


if __name__ == "__main__":
    main()
