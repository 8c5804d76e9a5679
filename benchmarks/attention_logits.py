"""What ``attn/<module>/max_logit`` costs a sampled step, measured side by side in one process.

The small GPT of ``agent_overhead.py`` (4 layers calling ``F.scaled_dot_product_attention``,
d_model 256, 4 heads, seq 128, batch 8, vocab 8192) trains with AdamW. Three kinds of step
take turns, one model, one optimizer:

* ``plain``: no agent;
* ``sampled, no probe``: every step sampled (``sample_every=1``), ``attention_logits=False``;
* ``sampled, probe``: the same with ``attention_logits=True`` (the default).

It prints the median of each and the probe's extra time (the difference of the last two).
A whole sampled step varies by a few per cent from one to the next (histograms, update
ratios), so it then times the forward and backward pass alone, with and without the probe
armed (``--repeats`` turns each), a lower-noise measure of the same cost, and the part the
probe timed itself (the logit computation, which the overhead governor counts); the rest is
the hooks and the torch-function mode passing every other torch call of the forward through.

    .venv/bin/python benchmarks/attention_logits.py [--steps 30] [--repeats 100] [--threads 2]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from agent_overhead import GPT, SHAPES

from trimtab.attention import AttentionProbe
from trimtab.watch import Watcher, WatchOptions


class NullSink:
    rank = 0

    def emit_scalars(self, step: int, wall: float, record: dict[str, float]) -> None: ...
    def emit_histogram(self, key: str, step: int, wall: float, summary: list[int], lo: float, width: float) -> None: ...
    def emit_event(self, kind: str, step: int | None, data: dict[str, Any], level: str = "info") -> None: ...
    def warn_once(self, topic: str, message: str) -> None:
        print(f"warning: {message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="measured steps per kind")
    parser.add_argument("--repeats", type=int, default=100, help="forward+backward passes per kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = SHAPES["small"]
    model = GPT(shape).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"{shape}; device: {label}; torch {torch.__version__}")

    watchers = {
        "sampled, no probe": Watcher(NullSink(), model, opt, None, None, _options(False)),
        "sampled, probe": Watcher(NullSink(), model, opt, None, None, _options(True)),
    }
    for watcher in watchers.values():  # both armed for step 0 at creation: only one may be
        for probe in watcher._probes:
            probe.collect()
    times: dict[str, list[float]] = {"plain": [], **{k: [] for k in watchers}}

    def step(kind: str, n: int) -> float:
        watcher = watchers.get(kind)
        if watcher is not None:
            for probe in watcher._probes:
                probe.arm()  # what the previous run.step of a watched loop does before a sampled step
        tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, shape.vocab), tokens[:, 1:].reshape(-1))
        loss.backward()  # type: ignore[no-untyped-call]
        if watcher is not None:
            watcher.step(loss, n, None, None)
            watcher.transfers.poll(wait=True)
            for probe in watcher._probes:  # re-armed for the next step: off while the other kinds run
                probe.collect()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for i in range(5):  # warm-up
        for kind in times:
            step(kind, i)
    for i in range(args.steps):
        for kind in times:
            times[kind].append(step(kind, 5 + i))
    for watcher in watchers.values():
        watcher.close()

    plain = statistics.median(times["plain"])
    for kind, measured in times.items():
        median = statistics.median(measured)
        print(f"{kind:<20}{median * 1e3:>10.1f} ms{median / plain:>9.3f} x plain")
    extra = statistics.median(times["sampled, probe"]) - statistics.median(times["sampled, no probe"])
    print(f"probe, whole sampled steps: {extra * 1e3:+.1f} ms ({extra / plain:+.1%} of a plain step)")

    probe = AttentionProbe(model, NullSink().warn_once)
    passes: dict[bool, list[float]] = {False: [], True: []}
    own: list[float] = []
    for i in range(args.repeats + 5):
        for armed in (False, True):
            if armed:
                probe.arm()
            tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            logits = model(tokens[:, :-1])
            F.cross_entropy(logits.float().reshape(-1, shape.vocab), tokens[:, 1:].reshape(-1)).backward()  # type: ignore[no-untyped-call]
            if armed:
                seen = probe.collect()
                torch.stack(seen.maxima).cpu()  # what the watcher's packed copy waits for
                own.append(seen.seconds)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:
                passes[armed].append(time.perf_counter() - start)
            opt.zero_grad(set_to_none=True)
    bare, armed_median = statistics.median(passes[False]), statistics.median(passes[True])
    extra = armed_median - bare
    print(
        f"forward+backward: {bare * 1e3:.1f} ms bare, {armed_median * 1e3:.1f} ms probed: {extra * 1e3:+.1f} ms "
        f"({extra / plain:+.1%} of a plain step, {extra / plain / 100:+.3%} amortised over 100 steps); "
        f"timed by the probe itself: {statistics.median(own) * 1e3:.1f} ms"
    )


def _options(attention: bool) -> WatchOptions:
    return WatchOptions(sample_every=1, attention_logits=attention, overhead_budget=None)


if __name__ == "__main__":
    main()
