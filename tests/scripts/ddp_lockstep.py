"""One rank of a 2-process CPU DDP job (gloo) whose ranks receive the same commands at
different steps, as a server's per-rank connections deliver them; run by
tests/agent/test_lockstep.py. Prints the rank's command history as JSON."""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import trimtab
from trimtab.protocol import Command


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--init", required=True, help="tcp://host:port")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--spool", required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--arrivals", required=True, help='JSON: {"<step>": [{"id", "kind", "args"}, ...]} for this rank')
    args = p.parse_args()
    arrivals = {int(k): v for k, v in json.loads(args.arrivals).items()}
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=2)
    run = trimtab.init(server=args.server, spool_dir=args.spool, project="ddp", replay_orphans=False)
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run.watch(model.module, opt, sample_every=1000)
    lrs = []
    for step in range(14):
        for command in arrivals.get(step, []):
            run._control.receive(Command(**command))  # what the sender thread does with a cmd frame
        if args.rank == 1:
            time.sleep(0.02)  # rank 1 runs a little behind, as real ranks do
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        run.step(loss, step=step)
        opt.step()
        opt.zero_grad()
        lrs.append(run.learning_rates()[0])
    history = [{k: h[k] for k in ("id", "kind", "status", "step")} for h in run.command_history()]
    weights = [round(float(v), 6) for v in model.module.weight.detach().flatten()]
    print("RESULT " + json.dumps({"history": history, "lrs": lrs, "weights": weights}), flush=True)
    run.finish(timeout=0.5)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
