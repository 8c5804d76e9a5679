"""Does acting on an instability rescue the run? Autopilot vs a human-speed command vs doing
nothing, on seeded CPU runs, each against its clean twin (same seed, no fault).

Scenarios (a 3-layer ReLU MLP on a teacher-student task, Adam 1e-3, 600 steps, fault at a
seeded onset between steps 250 and 400):

* ``high_lr``: the LR jumps x100 at the onset and stays there (a schedule mistake);
* ``corrupted``: two batches with inputs x1000;
* ``fp16_overflow``: fp16 autocast without a GradScaler; one batch overflows fp16, and its
  gradients are infinite;
* ``dead_relu``: three steps at LR 0.3 (a burst) kill ReLU units;
* ``lr_script``: the script sets its LR by hand every iteration and, from the onset, 100x
  too high (a rollback alone does not help: the script re-creates the fault);
* ``lr_scheduler``: the same fault made by a ``LambdaLR`` whose factor jumps x100;
* ``corrupted_weights``: the first layer's weights get noise of 30x their spread (a bad
  write); the loss jumps and stays up;
* ``persistent_nan``: one weight becomes Inf, so every later loss is NaN;
* ``healthy``: no fault (the autopilot must not make it worse).

Arms: ``none``; ``autopilot`` (``run.autopilot()`` with its defaults, snapshots every 10
steps); ``human``: 10 steps after the onset a person sends ``rollback`` to before the onset
(and, for the LR faults, ``set_lr`` back to the old LR, which holds on top of the script's
or scheduler's LR), through the same controller. A run whose autopilot gave up (it asks the
loop to stop offline) ends there. A run
*recovers* when its final held-out loss is within 0.05 nats of the clean twin's. Target:
the autopilot recovers >= 80 % of the recoverable runs (those the human rollback recovers)
and never harms a healthy one.

Runs offline (the agent spools; no server): commands go through the agent's controller as
the sender would hand them over.

    .venv/bin/python benchmarks/remediation.py [--seeds 5] [--first-seed 0]

Seeds 0-4 are the ones the autopilot's defaults were tuned on; report held-out seeds
(``--first-seed 5``) beside them.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import trimtab
from trimtab.protocol import Command

sys.path.insert(0, str(Path(__file__).parent))

from detector_scenarios import Teacher, mlp, onset_step

STEPS = 600
TOLERANCE = 0.05
HUMAN_DELAY = 10
SCENARIOS = (
    "high_lr",
    "corrupted",
    "fp16_overflow",
    "dead_relu",
    "lr_script",
    "lr_scheduler",
    "corrupted_weights",
    "persistent_nan",
    "healthy",
)
LR_FAULTS = ("high_lr", "lr_script", "lr_scheduler")
ARMS = ("none", "autopilot", "human")


def held_out_loss(model: nn.Module, seed: int) -> float:
    teacher = Teacher(seed)
    teacher.g.manual_seed(999)
    x, y = teacher.batch(4096)
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y)
    return float(loss) if torch.isfinite(loss) else math.inf


def train(scenario: str, seed: int, arm: str, spool: str) -> float:
    teacher, model = Teacher(seed), mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    onset = onset_step(seed, STEPS)
    sched = None
    if scenario == "lr_scheduler":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 100.0 if s >= onset else 1.0)
    fp16 = scenario == "fp16_overflow"
    run = trimtab.init(server="http://127.0.0.1:9", project="remediation", spool_dir=spool, replay_orphans=False)
    try:
        every = 10 if arm != "none" else None
        run.watch(
            model,
            opt,
            sample_every=10_000,
            histograms=False,
            overhead_budget=None,
            snapshot_every=every,
            snapshot_keep=5,
        )
        if arm == "autopilot":
            run.autopilot()
        control = run._control  # the sender's way in: commands arrive as frames
        for step in range(STEPS):
            x, y = teacher.batch()
            if scenario == "high_lr" and step == onset:
                for group in opt.param_groups:
                    group["lr"] *= 100
            if scenario == "lr_script":
                for group in opt.param_groups:
                    group["lr"] = 1e-3 * (100 if step >= onset else 1)
            if scenario == "corrupted_weights" and step == onset:
                with torch.no_grad():
                    weight = next(model.parameters())
                    weight.add_(torch.randn_like(weight) * 30 * weight.std())
            if scenario == "persistent_nan" and step == onset:
                with torch.no_grad():
                    next(model.parameters())[0, 0] = math.inf
            if scenario == "corrupted" and onset <= step < onset + 2:
                x = x * 1000
            if fp16 and step == onset:
                x = x * 3000
            if scenario == "dead_relu" and onset <= step < onset + 3:
                for group in opt.param_groups:
                    group["lr"] = 0.3
            if scenario == "dead_relu" and step == onset + 3:
                for group in opt.param_groups:
                    group["lr"] = 1e-3
            if arm == "human" and scenario != "healthy" and step == onset + HUMAN_DELAY:
                before = (onset - 1) // 10 * 10
                control.receive(Command(f"h{seed}", "rollback", {"to_step": before}))
                if scenario in LR_FAULTS:
                    control.receive(Command(f"l{seed}", "set_lr", {"lr": 1e-3}))
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            loss.backward()  # type: ignore[no-untyped-call]
            run.step(loss, step=step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if sched is not None:
                sched.step()
            if run.should_stop():  # the autopilot gave up (offline it asks the loop to stop)
                break
    finally:
        run.finish(timeout=0.2)
    return held_out_loss(model, seed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="5: the held-out seeds, never tuned on")
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    args = parser.parse_args()
    logging.getLogger("trimtab").setLevel(logging.ERROR)  # offline on purpose: no spool chatter
    started = time.perf_counter()
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as spool:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            twin = train("healthy", seed, "none", spool)
            for scenario in args.scenarios:
                for arm in ARMS:
                    final = twin if (scenario, arm) == ("healthy", "none") else train(scenario, seed, arm, spool)
                    results.setdefault((scenario, arm), []).append((final, twin))
            print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    recovered: Callable[[tuple[float, float]], bool] = lambda r: r[0] <= r[1] + TOLERANCE  # noqa: E731
    seeds = f"seeds {args.first_seed}-{args.first_seed + args.seeds - 1}"
    print(f"\nfinal held-out loss vs the clean twin; recovered = within {TOLERANCE} nats; {seeds}\n")
    print(f"{'scenario':15} {'arm':10} {'recovered':>10} {'mean excess (nats)':>19}")
    auto_ok = auto_total = 0
    harmed = False
    for scenario in args.scenarios:
        for arm in ARMS:
            rows = results[(scenario, arm)]
            excess = [f - t for f, t in rows]
            mean = sum(excess) / len(excess)
            shown = "inf" if math.isinf(mean) else f"{mean:+.3f}"
            print(f"{scenario:15} {arm:10} {sum(map(recovered, rows)):>6}/{len(rows):<3} {shown:>19}")
        if scenario == "healthy":
            harmed = not all(recovered(r) for r in results[(scenario, "autopilot")])
            continue
        for auto, human in zip(results[(scenario, "autopilot")], results[(scenario, "human")], strict=True):
            if recovered(human) or recovered(auto):  # recoverable: some action rescued it
                auto_total += 1
                auto_ok += recovered(auto)
        print()
    rate = auto_ok / max(auto_total, 1)
    print(
        f"autopilot recovered {auto_ok}/{auto_total} recoverable runs ({rate:.0%}); target >= 80 %: "
        f"{'ok' if rate >= 0.8 else 'MISSED'}; healthy runs harmed: {'YES' if harmed else 'none'}"
    )
    return 0 if rate >= 0.8 and not harmed else 1


if __name__ == "__main__":
    sys.exit(main())
