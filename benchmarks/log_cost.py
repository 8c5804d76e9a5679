"""Cost of ``Run.log`` on the training thread, in microseconds per scalar, by input shape.

The agent points at a closed port with the spool off, so only the training-thread cost is
measured (the sender thread drains in the background as it would in training). Target: <= 5 us.

    .venv/bin/python benchmarks/log_cost.py
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import trimtab

CALLS = 100_000
REPEATS = 5
TARGET_US = 5.0


def best_us_per_scalar(run: trimtab.Run, make: Callable[[int], dict[str, Any]], scalars: int) -> float:
    payloads = [make(i) for i in range(CALLS)]
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for step, payload in enumerate(payloads):
            run.log(payload, step=step)
        best = min(best, (time.perf_counter() - start) / CALLS / scalars * 1e6)
    return best


def main() -> None:
    import torch

    run = trimtab.init(
        server="http://127.0.0.1:9", spool_dir="off", replay_orphans=False, max_queue=10**8, max_memory_bytes=2**40
    )
    cases: list[tuple[str, Callable[[int], dict[str, Any]], int]] = [
        ("1 float per call", lambda i: {"loss": 1.0 / (i + 1)}, 1),
        ("8 floats per call", lambda i: {f"k{j}": float(i + j) for j in range(8)}, 8),
        ("1 CPU 0-d tensor per call", lambda i: {"loss": torch.tensor(float(i))}, 1),
    ]
    print(f"Run.log cost, best of {REPEATS} x {CALLS:,} calls")
    print(f"{'input':<28}{'us/scalar':>10}  target")
    for name, make, scalars in cases:
        us = best_us_per_scalar(run, make, scalars)
        print(f"{name:<28}{us:>10.3f}  <= {TARGET_US} {'PASS' if us <= TARGET_US else 'MISS'}")
    run.finish(timeout=0.1)


if __name__ == "__main__":
    main()
