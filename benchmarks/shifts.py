"""Shift versus harm, scored: do trimtab's shipped rules and its autopilot leave harmless
shifts alone and still catch harm? On the runs of ``shift_scenarios.py`` (a small GPT
trained as the public scripts train one; none of these scenarios was used to tune the
detectors before issue 13).

For every scenario and seed:

* **monitor**: the run is recorded through ``run.watch``'s own ``Watcher`` (sampled keys
  every 10 steps) and the shipped ``DEFAULT_RULES`` see every point in step order, as the
  server does. A *page* is a finding of severity warning or critical (those notify); an
  ``info`` finding is an annotation only. A harmful run is *caught* when a page comes within
  ``HORIZON`` steps of its onset; any page on a harmless run (before or after its shift),
  or before a harmful run's onset, is a false page.
* **autopilot** (harmless and healthy runs only): the same script with ``run.autopilot()``
  on (its defaults, snapshots every 10 steps), offline; any automatic action on a harmless
  run is a failure.

The *harm* column is the final loss (median of the last 50 steps) minus the healthy run's of
the same seed: what the change cost, with nothing acting on it (inf: the loss is NaN).

Targets (issue 13): recall >= 0.95 of harmful runs, 0 pages and 0 autopilot actions on the
harmless shifts, reported on held-out seeds. Seeds 0-4 were looked at while choosing the
rules; ``--first-seed 5`` are held out.

    .venv/bin/python benchmarks/shifts.py [--seeds 5] [--first-seed 0] [--scenarios ...] [--verbose]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from detector_scenarios import _Recorder, _watcher
from shift_scenarios import FAULT_KEYS, SCENARIOS, SHIFT_KEYS, Plan, train

import trimtab
from trimtab.detectors import CRITICAL, DEFAULT_RULES, WARNING, Finding, RuleEvaluator

HORIZON = 150
PAGES = (WARNING, CRITICAL)


def record(plan: Plan) -> dict[str, list[tuple[int, float]]]:
    sink = _Recorder()
    state: dict[str, Any] = {}

    def on_backward(step: int, loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        if "watcher" not in state:
            state["watcher"] = _watcher(sink, model, opt)
        state["watcher"].step(loss, step, None, None)

    train(plan, on_backward)
    state["watcher"].close()
    return sink.series


def findings(series: dict[str, list[tuple[int, float]]]) -> list[Finding]:
    feeds: dict[str, list[RuleEvaluator]] = {}
    for key in series:
        for rule in DEFAULT_RULES:
            if rule.enabled and rule.matches(key):
                ev = RuleEvaluator(rule, key)
                for watched in ev.keys:
                    feeds.setdefault(watched, []).append(ev)
    points = sorted(((s, k, v) for k, pts in series.items() for s, v in pts), key=lambda p: (p[0], p[1]))
    out = []
    for step, key, value in points:
        for ev in feeds.get(key, ()):
            found = ev.update(key, step, value)
            if found is not None:
                out.append(found)
    return out


def end_loss(series: dict[str, list[tuple[int, float]]]) -> float:
    """The median loss of the last 50 steps (inf when any of them is not finite)."""
    last = [v for _, v in series["loss"][-50:]]
    return statistics.median(last) if all(math.isfinite(v) for v in last) else math.inf


def gradient_jump(series: dict[str, list[tuple[int, float]]], at: int) -> float:
    """The largest gradient norm of the 10 steps from ``at`` over the median of the 100 before."""
    grad = dict(series["grad_norm/total"])
    before = [grad[s] for s in range(at - 100, at) if s in grad]
    after = [grad[s] for s in range(at, at + 10) if s in grad and math.isfinite(grad[s])]
    return max(after) / statistics.median(before) if after and before else math.inf


def autopilot_actions(plan: Plan, spool: str) -> list[tuple[int, str]]:
    """The automatic actions on the script with ``run.autopilot()`` on."""
    run = trimtab.init(server="http://127.0.0.1:9", project="shifts", spool_dir=spool, replay_orphans=False)
    actions: list[tuple[int, str]] = []
    record_automatic = run._control.record_automatic

    def counted(ident: str, kind: str, args: dict[str, Any], step: int, detail: dict[str, Any]) -> None:
        actions.append((step, kind))
        record_automatic(ident, kind, args, step, detail)

    run._control.record_automatic = counted  # type: ignore[method-assign]
    attached: list[bool] = []

    def on_backward(step: int, loss: torch.Tensor, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        if not attached:
            run.watch(model, opt, sample_every=10, histograms=False, overhead_budget=None, snapshot_every=10)
            run.autopilot()
            attached.append(True)
        run.step(loss, step=step)

    try:
        train(plan, on_backward, run.should_stop)
    finally:
        run.finish(timeout=0.2)
    return actions


def describe(found: list[Finding], at: int) -> str:
    firsts: dict[str, Finding] = {}
    for f in found:
        firsts.setdefault(f"{f.data.get('rule')}:{f.severity}", f)
    return ", ".join(f"{name}@{f.step - at:+d}" for name, f in firsts.items()) or "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="5: the held-out seeds")
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    parser.add_argument("--no-autopilot", action="store_true", help="score the rules only")
    parser.add_argument("--verbose", action="store_true", help="every run's findings")
    args = parser.parse_args()
    logging.getLogger("trimtab").setLevel(logging.ERROR)  # offline on purpose: no spool chatter
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows: dict[str, list[dict[str, Any]]] = {}
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    with tempfile.TemporaryDirectory() as spool:
        for scenario in args.scenarios:
            for seed in seeds:
                plan = Plan(scenario, seed)
                series = record(plan)
                found = findings(series)
                pages = [f for f in found if f.severity in PAGES]
                row: dict[str, Any] = {"seed": seed, "at": plan.at, "end": end_loss(series)}
                row["jump"] = gradient_jump(series, plan.at)
                if plan.harmful:
                    row["false"] = [f for f in pages if f.step < plan.at]
                    hits = [f.step for f in pages if plan.at <= f.step < plan.at + HORIZON]
                    row["latency"] = min(hits) - plan.at if hits else None
                else:
                    row["false"] = pages
                    row["info"] = [f for f in found if f.severity not in PAGES]
                    if not args.no_autopilot:
                        row["actions"] = autopilot_actions(plan, spool)
                rows.setdefault(scenario, []).append(row)
                if args.verbose:
                    acted = row.get("actions")
                    print(
                        f"  {scenario:18} seed {seed} at {plan.at} (gradient norm x{row['jump']:.1f}): "
                        f"{describe(found, plan.at)}" + (f"; autopilot {acted}" if acted else ""),
                        flush=True,
                    )
            print(f"{scenario} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return 0 if report(rows, seeds) else 1


def report(rows: dict[str, list[dict[str, Any]]], seeds: range) -> bool:
    print(f"\nseeds {seeds.start}-{seeds.stop - 1}; caught = a warning/critical page within {HORIZON} steps\n")
    print(
        f"{'scenario':18} {'kind':8} {'caught':>7} {'latency p50/max':>16} {'false pages':>12} {'info':>5} "
        f"{'autopilot':>10} {'end-twin':>8} {'grad jump':>10}"
    )
    caught = harmful = false_pages = acted = 0
    twin = {r["seed"]: r["end"] for r in rows.get("healthy", ())}
    for scenario, results in rows.items():
        n = len(results)
        excess = [r["end"] - twin[r["seed"]] for r in results if r["seed"] in twin]
        harm = "-" if not excess else f"{statistics.mean(excess):+.2f}"
        false = sum(bool(r["false"]) for r in results)
        finite = [r["jump"] for r in results if math.isfinite(r["jump"])]
        jumps = f"{min(finite):.1f}-{max(finite):.1f}x" if finite else "-"
        false_pages += sum(len(r["false"]) for r in results)
        if scenario in FAULT_KEYS:
            lat = sorted(r["latency"] for r in results if r["latency"] is not None)
            harmful += n
            caught += len(lat)
            shown = f"{statistics.median_low(lat)}/{lat[-1]}" if lat else "-"
            print(
                f"{scenario:18} {'harmful':8} {len(lat):>3}/{n:<3} {shown:>16} {false:>8}/{n:<3} {'':>5} "
                f"{'':>10} {harm:>8} {jumps:>10}"
            )
        else:
            kind = "shift" if scenario in SHIFT_KEYS else "healthy"
            runs_acted = sum(bool(r.get("actions")) for r in results)
            acted += runs_acted
            info = sum(bool(r["info"]) for r in results)
            auto = f"{runs_acted}/{n}" if "actions" in results[0] else "-"
            print(
                f"{scenario:18} {kind:8} {'':>7} {'':>16} {false:>8}/{n:<3} {info:>5} {auto:>10} {harm:>8} {jumps:>10}"
            )
    recall = caught / max(harmful, 1)
    ok = recall >= 0.95 and false_pages == 0 and acted == 0
    print(
        f"\nrecall {caught}/{harmful} = {recall:.2f} (target >= 0.95); false pages {false_pages} (target 0); "
        f"harmless runs the autopilot acted on {acted} (target 0): {'ok' if ok else 'MISSED'}"
    )
    return ok


if __name__ == "__main__":
    sys.exit(main())
