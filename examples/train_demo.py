"""A small CPU training run that streams into trimtab: a 2-layer character-level transformer
learning a synthetic text, with LR warm-up and cosine decay, and one corrupted batch.

    TRIMTAB_SERVER=http://127.0.0.1:8000 python examples/train_demo.py --steps 1000
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import trimtab

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 200


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d_model: int = 64, n_layers: int = 2, seq: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=4 * d_model, batch_first=True, norm_first=True
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--corrupt-at", type=int, default=500, help="feed one batch of random tokens at this step")
    parser.add_argument("--name", default="demo-tiny-gpt")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT])
    model = TinyGPT(len(chars), seq=args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )

    run = trimtab.init(project="demo", name=args.name, config=vars(args))
    run.watch(model, opt, sched, batch_size=args.batch, tokens_per_step=args.batch * args.seq)
    print(f"training {args.steps} steps; streaming to {run.options.server}", flush=True)
    for step in range(args.steps):
        idx = torch.randint(0, len(data) - args.seq - 1, (args.batch,))
        x = torch.stack([data[i : i + args.seq] for i in idx])
        y = torch.stack([data[i + 1 : i + args.seq + 1] for i in idx])
        if step == args.corrupt_at:
            y = torch.randint(0, len(chars), y.shape)  # a corrupted batch: labels are noise
        loss = nn.functional.cross_entropy(model(x).reshape(-1, len(chars)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        run.step(loss)  # loss, grad norms before clipping, lr, throughput; histograms every 100 steps
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}", flush=True)
    ok = run.finish(timeout=30)
    print(f"done: run {run.id} {'fully stored' if ok else 'NOT fully acknowledged (kept in the spool)'}", flush=True)


if __name__ == "__main__":
    main()
