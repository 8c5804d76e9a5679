"""What the alert engine costs per ingested point, and whether it slows ingest down.

1. Evaluation: the shipped default rules fed a run's usual keys in memory (no database),
   in microseconds per point, for a matched key and for a key no rule matches.
2. Ingest side by side on one SQLite file: the ingest writer alone, then the writer with the
   engine attached (which evaluates on its own thread after each commit). Reported: writer
   throughput in both modes, and how long the engine needs after the last commit to catch up.

    .venv/bin/python benchmarks/alert_engine.py [--batches 200] [--steps 100] [--keys 16]
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from array import array
from pathlib import Path

from trimtab.detectors import DEFAULT_RULES, RuleEvaluator
from trimtab.protocol import Batch, Hello, RunRef, ScalarSeries
from trimtab.server.alerts.engine import AlertEngine
from trimtab.server.alerts.slots import EngineStats, Op, Slot, feed_point
from trimtab.server.db import migrate
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store
from trimtab.server.ingest import IngestWriter


def evaluation_us_per_point(n: int = 200_000) -> dict[str, float]:
    rng = random.Random(0)
    values = [1.0 + rng.gauss(0, 0.01) for _ in range(n)]
    out = {}
    for key in ("loss", "grad_norm/total", "lr"):
        slots = [
            Slot(0, spec, key, RuleEvaluator(spec, key), dict.fromkeys(spec.watched_keys(key)), None, None)
            for spec in DEFAULT_RULES
            if spec.matches(key)
        ]
        ops: list[Op] = []
        stats = EngineStats()
        start = time.perf_counter()
        for step, value in enumerate(values):
            for slot in slots:  # what the engine does per routed slot
                feed_point(slot, key, step, value, ops, stats)
        out[f"{key} ({len(slots)} rules)"] = (time.perf_counter() - start) / n * 1e6
    return out


def _batches(n_batches: int, steps: int, keys: list[str]) -> list[Batch]:
    rng = random.Random(1)
    out = []
    for b in range(n_batches):
        first = b * steps
        step_arr = array("q", range(first, first + steps))
        walls = array("d", [time.time()] * steps)
        series = [
            ScalarSeries(
                k, step_arr, walls, array("d", [2.0 * math.exp(-s / 5000) + rng.gauss(0, 0.01) for s in step_arr])
            )
            for k in keys
        ]
        out.append(Batch(b + 1, series))
    return out


def ingest(db: str, batches: list[Batch], with_engine: bool, uid: str) -> tuple[float, float]:
    """(seconds to commit every batch, seconds more for the engine to finish)."""
    engine = make_engine(db)
    store = Store(engine)
    alerts = AlertEngine(store, "http://bench") if with_engine else None
    writer = IngestWriter(store, on_commit=alerts.submit if alerts else None)
    if alerts:
        alerts.start()
    writer.start()
    run_id, _ = store.open_run(Hello(RunRef(uid, "bench", uid), 1, "0", "host", 1, 0, 1, {}))
    try:
        start = time.perf_counter()
        futures = [writer.submit(run_id, 0, b) for b in batches]
        for f in futures:
            f.result(300)
        committed = time.perf_counter() - start
        caught_up = 0.0
        if alerts:
            alerts.flush(300)
            caught_up = time.perf_counter() - start - committed
        return committed, caught_up
    finally:
        writer.stop()
        if alerts:
            alerts.stop()
        engine.dispose()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--keys", type=int, default=16, help="keys per batch; loss and grad_norm/total among them")
    p.add_argument("--no-rule-keys", action="store_true", help="only keys no rule matches (as benchmarks/ingest.py)")
    args = p.parse_args()

    print("evaluation, default rules, in memory (us per point per key)")
    for key, us in evaluation_us_per_point().items():
        print(f"  {key:<34}{us:8.2f}")

    keys = ["loss", "grad_norm/total", *[f"layer{i}/grad_norm" for i in range(args.keys - 2)]]
    if args.no_rule_keys:
        keys = [f"bench/k{i:03d}" for i in range(args.keys)]
    batches = _batches(args.batches, args.steps, keys)
    points = args.batches * args.steps * len(keys)
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{Path(tmp) / 'bench.db'}"
        migrate.upgrade(db)
        rows = []
        for i, mode in enumerate((False, True, False, True)):  # alternate, to even out drift
            committed, caught_up = ingest(db, batches, mode, f"run-{i}")
            rows.append((mode, committed, caught_up))
    print(f"\ningest of {points:,} points ({len(keys)} keys, {args.steps} steps per batch), SQLite file")
    print(f"  {'mode':<16}{'commit s':>10}{'points/s':>12}{'engine lag s':>14}")
    for mode, committed, caught_up in rows:
        name = "writer + engine" if mode else "writer alone"
        print(f"  {name:<16}{committed:>10.3f}{points / committed:>12,.0f}{caught_up:>14.3f}")


if __name__ == "__main__":
    main()
