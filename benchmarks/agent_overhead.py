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

On CUDA, ``--model gpt100m --amp bf16`` trains a 110 M-parameter GPT (12 layers, d_model
768, 12 heads, seq 512, batch 16, vocab 16384) under bf16 autocast; a last pass of
non-sampled steps runs ``run.step`` under ``torch.cuda.set_sync_debug_mode("warn")`` and
counts the host synchronisations it makes (target: none). GPU target: default cadence
<= 0.5 % of a step.

    .venv/bin/python benchmarks/agent_overhead.py [--steps 400] [--device cpu|cuda]
        [--model small|gpt100m] [--amp none|bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import statistics
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import trimtab


@dataclass(frozen=True)
class Shape:
    vocab: int
    d_model: int
    heads: int
    layers: int
    seq: int
    batch: int


SHAPES = {
    "small": Shape(vocab=8192, d_model=256, heads=4, layers=4, seq=128, batch=8),  # 7.4 M parameters
    "gpt100m": Shape(vocab=16384, d_model=768, heads=12, layers=12, seq=512, batch=16),  # 110 M parameters
}


class Block(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        d = shape.d_model
        self.heads = shape.heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attn)
        out: torch.Tensor = x + self.out(self.act(self.fc(self.ln2(x))))
        return out


class GPT(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.embed = nn.Embedding(shape.vocab, shape.d_model)
        self.pos = nn.Parameter(torch.zeros(shape.seq, shape.d_model))
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.layers))
        self.ln_f = nn.LayerNorm(shape.d_model)
        self.head = nn.Linear(shape.d_model, shape.vocab, bias=False)

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
    line = f"histograms of all weights: trimtab {ours * 1e3:.1f} ms, torch.histc {histc * 1e3:.1f} ms"
    line += f" ({histc / ours:.1f}x)"
    if weights[0].device.type != "cpu":  # the deterministic fallback (scatter_add_) beside it
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            line += f", trimtab deterministic {best(lambda: [summarize(w, 64) for w in weights]) * 1e3:.1f} ms"
        finally:
            torch.use_deterministic_algorithms(False)
    print(line)


SYNC_SITES: dict[str, int] = {}  # where the counted synchronisations happened: stack -> count


def count_syncs(fn: Any) -> int:
    """Host synchronisations ``fn`` makes, as torch's CUDA sync debug mode reports them; the
    Python stack of each lands in SYNC_SITES."""
    found = 0

    def capture(message: Any, *_: Any, **__: Any) -> None:
        nonlocal found
        if "called a synchronizing" in str(message):  # not the mode's own "prototype feature" note
            found += 1
            frames = traceback.extract_stack()[:-2]
            site = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-6:]))
            SYNC_SITES[site] = SYNC_SITES.get(site, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = capture
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return found


def profile_steps(train_step: Any, steps: list[int]) -> None:
    """torch.profiler over the given steps: the ops that cost the most GPU and CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for s in steps:
            train_step("default", s, True)
    table = prof.key_averages()
    print(table.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=48))
    print(table.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="measured steps per mode")
    parser.add_argument("--block", type=int, default=10, help="steps per turn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=sorted(SHAPES), default="small")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast dtype of the forward")
    parser.add_argument("--sync-steps", type=int, default=50, help="non-sampled steps checked for syncs (CUDA)")
    parser.add_argument("--skip-histc", action="store_true", help="skip the histogram-vs-histc timing")
    parser.add_argument("--profile", action="store_true", help="profile a sampled and a plain step (CUDA)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = SHAPES[args.model]
    model = GPT(shape).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    n_params = sum(p.numel() for p in model.parameters())
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(
        f"model: {n_params / 1e6:.1f} M parameters, {len(list(model.parameters()))} tensors, {shape}; "
        f"device: {label}; torch {torch.__version__}; autocast: {args.amp}"
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()

    spool = tempfile.mkdtemp(prefix="trimtab-bench-")
    run = trimtab.init(server="http://127.0.0.1:9", spool_dir=spool, replay_orphans=False, name="agent-overhead")

    in_step: dict[str, list[float]] = {m: [] for m in MODES}

    syncs: list[int] = []

    def train_step(mode: str, mode_step: int, watched: bool, check_syncs: bool = False) -> float:
        tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, shape.vocab), tokens[:, 1:].reshape(-1))
        loss.backward()  # type: ignore[no-untyped-call]

        def update() -> None:  # run.step, and the optimizer step the agent wraps
            if watched:
                before = time.perf_counter()
                run.step(loss, step=mode_step, batch_size=shape.batch, tokens=shape.batch * shape.seq)
                in_step[mode].append(time.perf_counter() - before)
            opt.step()
            opt.zero_grad(set_to_none=True)

        if check_syncs:
            syncs.append(count_syncs(update))
        else:
            update()
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
    sampled_syncs = 0
    if device.type == "cuda" and args.sync_steps > 0:
        first = -(-next_step["default"] // 100) * 100 + 1  # just after a sampled step
        run._train_step = first - 1
        run.watch(model, opt)  # default cadence
        for s in range(first, first + args.sync_steps):  # plain steps only
            train_step("default", s, True, check_syncs=True)
        sampled_syncs = count_syncs(lambda: train_step("default", first + 99, True))  # the next sampled step
        if args.profile:
            profile_steps(train_step, [first + 100, first + 199])  # a plain step, then a sampled one
        run.unwatch()
    if not args.skip_histc:
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
    if syncs:
        print(f"host synchronisations in {len(syncs)} plain watched steps (run.step, optimizer.step): {sum(syncs)}")
        print(f"host synchronisations in one sampled step (forward to optimizer.step): {sampled_syncs}")
        for site, n in SYNC_SITES.items():
            print(f"  {n} x {site}")


if __name__ == "__main__":
    main()
