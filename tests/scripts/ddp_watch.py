"""One rank of a 2-process CPU DDP job (gloo) that trains with ``run.watch``; run by
tests/integration/test_instrumentation.py. Rank 1 feeds a NaN batch at --nan-step."""

from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import trimtab
from trimtab import internal


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--spool", required=True)
    p.add_argument("--init", required=True, help="tcp://host:port")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--nan-step", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=2)
    run = trimtab.init(server=args.server, spool_dir=args.spool, project="ddp", name="two-ranks")
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run.watch(model.module, opt, sample_every=2)
    for step in range(args.steps):
        x = torch.randn(4, 4) + args.rank
        if args.rank == 1 and step == args.nan_step:
            x[0, 0] = math.nan
        loss = model(x).pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        run.step(loss)
        opt.zero_grad()  # no optimizer step: the NaN must not spread to the other steps' weights
    ok = run.finish(timeout=60)
    dist.destroy_process_group()
    print("FINISH", ok, run.uid, flush=True)
    return 0 if ok and internal.error_count() == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
