"""A small GPT trained the way the popular public scripts train one (nanoGPT's train.py and its
descendants), with trimtab attached by the few lines a user would add (marked ``trimtab:``).

What makes it a test of trimtab rather than a loop shaped for it: the script owns its LR and
assigns it to every param group every iteration (warm-up, then cosine decay); it accumulates
gradients over micro-batches with a GradScaler (a pass-through unless fp16), unscales and
clips before the step, resumes from its own checkpoint (model, optimizer, iteration), and
steps its optimizer through ``scaler.step``. The configuration is module-level globals that
``--name=value`` arguments override.

Run by tests/integration/test_nanogpt_style.py; prints nanoGPT-style progress lines.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import trimtab

# ----------------------------------------------------------------------------- config
out_dir = "out"
init_from = "scratch"  # or "resume": continue from out_dir/ckpt.pt
max_iters = 400
log_interval = 50
batch_size = 8
block_size = 16
gradient_accumulation_steps = 4
n_layer, n_head, n_embd, vocab_size = 2, 2, 32, 64
learning_rate = 6e-3
min_lr = 6e-4
warmup_iters = 20
lr_decay_iters = 400
weight_decay = 0.1
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
dtype = "float32"  # "float16" turns the GradScaler on (as on a GPU)
corrupt_iter = -1  # one batch of random tokens at this iteration (a corrupted shard)
throttle_ms = 0.0  # sleep per iteration: a step as slow as a real model's
snapshot_every = 50  # trimtab: rolling snapshots for `rollback`
seed = 1337


def configure(argv: list[str]) -> None:
    """nanoGPT's configurator: ``--name=value`` overrides a global of the same type."""
    for arg in argv:
        name, _, raw = arg.removeprefix("--").partition("=")
        if name not in globals():
            raise SystemExit(f"unknown config key {name!r}")
        kind = type(globals()[name])
        globals()[name] = raw if kind is str else kind(raw)


# ----------------------------------------------------------------------------- model
class CausalSelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(n_embd, dim=2)
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return out


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd), CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc, self.c_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        out: torch.Tensor = x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))
        return out


class GPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block() for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss: torch.Tensor = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2))


# ----------------------------------------------------------------------------- data
def make_data(n: int, generator: torch.Generator) -> torch.Tensor:
    """A token stream with structure to learn: next = 3 * token + 1 (mod vocab), 10 % noise."""
    data = torch.empty(n, dtype=torch.long)
    data[0] = 0
    noise = torch.rand(n, generator=generator) < 0.1
    random_tokens = torch.randint(0, vocab_size, (n,), generator=generator)
    for i in range(1, n):
        data[i] = random_tokens[i] if noise[i] else (3 * data[i - 1] + 1) % vocab_size
    return data


def get_batch(data: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([data[i : i + block_size] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in ix])
    return x, y


def get_lr(it: int) -> float:
    """Linear warm-up, then cosine decay to min_lr (nanoGPT's schedule)."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# ----------------------------------------------------------------------------- training
def main(argv: list[str]) -> None:
    configure(argv)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    data = make_data(20_000, gen)
    model = GPT()
    optimizer = model.configure_optimizers()
    iter_num = 0
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if init_from == "resume":
        checkpoint: dict[str, Any] = torch.load(ckpt_path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        iter_num = checkpoint["iter_num"]
    scaler = torch.amp.GradScaler("cpu", enabled=(dtype == "float16"))

    run = trimtab.init(project="nanogpt", name=f"gpt-{init_from}")  # trimtab: server and token from the env
    run.watch(model, optimizer, scaler=scaler, snapshot_every=snapshot_every)  # trimtab

    t0 = time.time()
    while iter_num < max_iters:
        lr = get_lr(iter_num)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        loss_accum = 0.0
        for _ in range(gradient_accumulation_steps):
            X, Y = get_batch(data, gen)
            if iter_num == corrupt_iter:
                X, Y = torch.randint(0, vocab_size, X.shape), torch.randint(0, vocab_size, Y.shape)
            loss = model(X, Y) / gradient_accumulation_steps
            loss_accum += loss.item()
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        run.step(loss_accum, step=iter_num)  # trimtab: commands apply here, before the update
        if grad_clip != 0.0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if iter_num % log_interval == 0:
            dt = time.time() - t0
            print(f"iter {iter_num}: loss {loss_accum:.4f}, lr {lr:.3e}, time {dt * 1000:.0f}ms", flush=True)
        iter_num += 1
        if run.should_stop():  # trimtab: a `stop` command
            break
        if throttle_ms:
            time.sleep(throttle_ms / 1000)
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": iter_num}, ckpt_path)
    updates = int(max(float(s["step"]) for s in optimizer.state_dict()["state"].values()))
    print(json.dumps({"iter_num": iter_num, "optimizer_updates": updates}), flush=True)
    run.finish()


if __name__ == "__main__":
    main(sys.argv[1:])
