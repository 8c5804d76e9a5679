"""A slow real training loop for the browser tests: streams to a server while the pages are
looked at, feeds one NaN batch, prints every LR change it sees, and stops on ``stop``.

    python dashboard_trainer.py URL TOKEN --nan-at 40 --delay 0.05 --max-steps 4000
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import trimtab


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("server")
    parser.add_argument("token")
    parser.add_argument("--nan-at", type=int, default=40)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=4000)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    run = trimtab.init(project="browser", name="live-run", server=args.server, token=args.token or None)
    run.watch(model, opt, batch_size=16, sample_every=20, overhead_budget=None)
    lr = run.learning_rates()[0]  # the LR updates use, LR commands included
    for step in range(args.max_steps):
        x = torch.randn(16, 8)
        y = x[:, :1] * 2
        if step == args.nan_at:
            x[0, 0] = float("nan")  # one poisoned batch: a NaN loss, and the agent's event
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        run.step(loss)
        if torch.isfinite(loss):
            opt.step()
        now = run.learning_rates()[0]
        if now != lr:
            print(f"lr {lr:g} -> {now:g} at step {step}", flush=True)
            lr = now
        if run.should_stop():
            print(f"stopped at step {step}", flush=True)
            break
        time.sleep(args.delay)
    run.finish(timeout=30)


if __name__ == "__main__":
    main()
