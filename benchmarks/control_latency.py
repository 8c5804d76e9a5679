"""How long from a person's POST to the command taking effect in the training loop, and to
the server knowing it did: a real ``trimtab server`` (SQLite, loopback), a real agent, a real
torch loop stepping every ``--step-ms`` milliseconds.

For each sample the benchmark POSTs a ``reduce_lr`` (factor 0.999) and measures

* POST -> applied: until the training thread applied it at its next step boundary (the
  benchmark watches the optimizer's LR change from the training thread);
* POST -> acknowledged: until ``GET /api/v1/runs/{id}/commands/{cid}`` says ``applied``
  (polled every 2 ms).

Target: p95 <= 100 ms plus one step.

    .venv/bin/python benchmarks/control_latency.py [--samples 40] [--step-ms 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import nn

import trimtab

ROOT = Path(__file__).resolve().parents[1]


def http(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--step-ms", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "trimtab.cli", "server", "--port", str(port), "--no-auth", "--data-dir", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    http("GET", url + "/readyz")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            return measure(url, Path(tmp), args)
        finally:
            server.terminate()
            server.wait(15)


def measure(url: str, tmp: Path, args: argparse.Namespace) -> int:
    run = trimtab.init(server=url, project="latency", spool_dir=str(tmp / "spool"), replay_orphans=False)
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run.watch(model, opt, sample_every=10_000)
    changed: list[float] = []  # perf_counter() when the training thread saw the LR change
    stop = threading.Event()
    step_s = args.step_ms / 1000

    def train() -> None:
        step, last_lr = 0, run.learning_rates()[0]
        while not stop.is_set():
            started = time.perf_counter()
            loss = model(torch.randn(4, 8)).pow(2).mean()
            loss.backward()  # type: ignore[no-untyped-call]
            run.step(loss, step=step)
            if run.learning_rates()[0] != last_lr:  # the LR the next update uses
                changed.append(time.perf_counter())
                last_lr = run.learning_rates()[0]
            opt.step()
            opt.zero_grad()
            step += 1
            time.sleep(max(0.0, step_s - (time.perf_counter() - started)))

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    run_id = run.wait_for_id(30)
    assert run_id is not None
    applied, acked = [], []
    try:
        for i in range(args.samples + 3):
            seen = len(changed)
            t0 = time.perf_counter()
            cmd = http("POST", f"{url}/api/v1/runs/{run_id}/commands", {"kind": "reduce_lr", "args": {"factor": 0.999}})
            while True:
                got = http("GET", f"{url}/api/v1/runs/{run_id}/commands/{cmd['id']}")
                if got["status"] in ("applied", "rejected"):
                    break
                time.sleep(0.002)
            t_ack = time.perf_counter()
            assert got["status"] == "applied", got
            while len(changed) == seen:
                time.sleep(0.001)
            if i >= 3:  # warm-up samples
                applied.append(1000 * (changed[seen] - t0))
                acked.append(1000 * (t_ack - t0))
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
        run.finish(timeout=10)
    target = 100 + args.step_ms
    print(f"\n{args.samples} commands, training step {args.step_ms:g} ms, SQLite, loopback")
    print(f"{'ms':28} {'p50':>7} {'p95':>7} {'max':>7}")
    for name, values in (("POST -> applied in training", applied), ("POST -> server says applied", acked)):
        print(f"{name:28} {statistics.median(values):7.1f} {pct(values, 0.95):7.1f} {max(values):7.1f}")
    ok = pct(acked, 0.95) <= target
    print(f"target p95 <= {target:g} ms (100 ms + one step): {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
