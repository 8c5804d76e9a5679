"""A small CPU training run that streams into trimtab and goes wrong on purpose: a 2-layer
character-level transformer learning a synthetic text, in three acts.

1. It trains normally (LR warm-up, then cosine decay) and the loss falls to about 0.7.
2. At ``--poison-at`` one batch is padding only: its masked mean loss is 0/0 = NaN. The
   agent reports where the NaN came from, and the loop skips that update, as most trainers
   do when the gradient norm is not finite. Training goes on unharmed.
3. At ``--bad-at`` the LR schedule goes wrong, as if a warm restart had been configured with
   the wrong peak: the LR jumps to ``--bad-mult`` (30) times the peak LR and stays there.
   The loss blows up and stays up, the gradient norm with it, and trimtab's default alerts
   fire. It only recovers once someone sends ``reduce_lr`` (``scripts/demo.py`` does, or you
   press "Reduce LR" in the dashboard's control panel): trimtab scales the whole schedule,
   and the loss comes back down. The autopilot stays off, so the recovery is the command's.

    TRIMTAB_SERVER=http://127.0.0.1:8000 python examples/train_demo.py --steps 2500
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
from torch import nn

import trimtab

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", ";"]
WORDS += ["pack", "my", "box", "with", "five", "dozen", "liquor", "jugs", "."]
# Words in random order: real uncertainty at every word boundary, so the loss settles near
# 0.7 rather than zero, and a blow-up stands out against it.
_rng = random.Random(0)
TEXT = " ".join(_rng.choice(WORDS) for _ in range(20_000))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d_model: int = 64, n_layers: int = 2, seq: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, 4, 4 * d_model, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)
        self.mask: torch.Tensor
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:n]
        out: torch.Tensor = self.head(self.blocks(x, mask=self.mask[:n, :n], is_causal=True))
        return out


def lr_factor(step: int, steps: int, bad_at: int, bad_mult: float) -> float:
    """The LR as a multiple of ``--lr``: a linear warm-up over 5 % of the run, cosine decay to
    zero; from ``bad_at`` on, the misconfigured restart's constant ``bad_mult``."""
    if step >= bad_at:
        return bad_mult
    warmup = max(1, steps // 20)
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=6e-3, help="the peak LR")
    parser.add_argument("--poison-at", type=int, default=500, help="a padding-only batch (NaN loss); -1: none")
    parser.add_argument("--bad-at", type=int, default=1000, help="the step the LR schedule goes wrong; -1: never")
    parser.add_argument("--bad-mult", type=float, default=30.0, help="the bad LR, as a multiple of the peak LR")
    parser.add_argument("--print-every", type=int, default=250)
    parser.add_argument(
        "--min-step-time", type=float, default=0.05, help="seconds: a pace a person can watch live (0: full speed)"
    )
    parser.add_argument("--name", default="demo-tiny-gpt")
    args = parser.parse_args(argv)
    if args.bad_at < 0:
        args.bad_at = args.steps
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT])
    model = TinyGPT(len(chars), seq=args.seq)
    # beta2 0.95 as large language models use it; the blow-up below does not settle by itself
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps, args.bad_at, args.bad_mult))

    run = trimtab.init(project="demo", name=args.name, config=vars(args))
    run.watch(model, opt, sched, batch_size=args.batch, tokens_per_step=args.batch * args.seq)
    plan = [f"training {args.steps} steps, streaming to {run.options.server}"]
    if 0 <= args.poison_at < args.steps:
        plan.append(f"a NaN batch at step {args.poison_at}")
    if args.bad_at < args.steps:
        plan.append(f"the LR goes {args.bad_mult:g}x too high at step {args.bad_at}")
    print("; ".join(plan), flush=True)
    window: list[float] = []
    scale = 1.0  # the LR over the planned one: a reduce_lr command changes it
    for step in range(args.steps):
        started = time.monotonic()
        idx = torch.randint(0, len(data) - args.seq - 1, (args.batch,))
        x = torch.stack([data[i : i + args.seq] for i in idx])
        y = torch.stack([data[i + 1 : i + args.seq + 1] for i in idx])
        weight = torch.zeros(y.numel()) if step == args.poison_at else torch.ones(y.numel())
        token_loss = nn.functional.cross_entropy(model(x).reshape(-1, len(chars)), y.reshape(-1), reduction="none")
        loss = (token_loss * weight).sum() / weight.sum()  # the padding-only batch: 0 / 0
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        run.step(loss)  # loss, grad norms, LR, throughput, NaN provenance; commands are applied here
        lr, planned = run.learning_rates()[0], args.lr * lr_factor(step, args.steps, args.bad_at, args.bad_mult)
        if not math.isclose(lr, scale * planned):
            scale = lr / planned
            print(f"step {step:5d}  a command set the LR to {lr:.3g} ({scale:.3g}x the schedule)", flush=True)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        value = loss.item()
        if torch.isfinite(grad_norm):
            opt.step()
        else:
            print(f"step {step:5d}  loss {value}: update skipped", flush=True)
        sched.step()
        if math.isfinite(value):
            window.append(value)
        if (step + 1) % args.print_every == 0 or step + 1 == args.steps:
            mean = sum(window) / max(1, len(window))
            print(f"{step + 1:5d} steps  loss {mean:8.3f} (mean of the last {len(window)})  lr {lr:.3g}", flush=True)
            window.clear()
        time.sleep(max(0.0, started + args.min_step_time - time.monotonic()))
    ok = run.finish(timeout=30)
    print(f"done: run {run.id} {'fully stored' if ok else 'NOT fully acknowledged (kept in the spool)'}", flush=True)


if __name__ == "__main__":
    main()
