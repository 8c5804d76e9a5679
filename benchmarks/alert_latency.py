"""Alert latency: from ``run.log({"loss": nan})`` in a training script to the webhook request
arriving at the receiver, on loopback.

One run of this script:

(a) starts a real ``trimtab server`` subprocess (SQLite file by default, or PostgreSQL with
    ``--pg-url``) with no alert rules configured: the shipped ``nonfinite-loss`` default fires;
(b) starts a webhook receiver in this process (``http.server``) and registers it as a sink
    through ``POST /api/v1/sinks``;
(c) ``--runs`` times: ``trimtab.init`` a new run (the agent's defaults, so a 0.2 s flush
    interval), logs a few finite losses and waits until they are stored (so the connection
    is up and the handshake is not timed), then logs a NaN loss and takes the time; the
    receiver takes the time when the ``firing`` request for that run arrives. Both clocks are
    this process's ``time.time()``. Then ``finish()`` (which resolves the alert; that
    notification is not timed).
(d) prints p50 / p95 / max of the latency, split at the alert's ``fired_at`` (the server's
    clock, same machine; set just before the alert's transaction commits) into agent +
    ingest + rule evaluation, and commit + outbox + delivery.

With ``--pg-url`` the script creates its own ``trimtab_latency_<random>`` database next to
the one named, and drops it at the end.

    .venv/bin/python benchmarks/alert_latency.py               # SQLite, 30 runs
    .venv/bin/python benchmarks/alert_latency.py --runs 50 --pg-url postgresql://postgres@127.0.0.1:5432/test

Exit status: 0 when every NaN was delivered (a missed p95 target is reported; it fails the
run only with ``--strict``), 1 when a delivery did not arrive, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

P95_TARGET_S = 0.5
DELIVERY_WAIT_S = 30.0
REPO = Path(__file__).resolve().parent.parent


class Arrivals:
    """When the first ``firing`` request for each run arrived, and its alert."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[float, dict[str, Any]]] = {}
        self.cond = threading.Condition()

    def add(self, at: float, body: dict[str, Any]) -> None:
        if body.get("event") != "firing":
            return
        with self.cond:
            self.first.setdefault(str(body["alert"]["run_name"]), (at, body["alert"]))
            self.cond.notify_all()

    def wait(self, run_name: str, timeout: float) -> tuple[float, dict[str, Any]] | None:
        with self.cond:
            self.cond.wait_for(lambda: run_name in self.first, timeout)
            return self.first.get(run_name)


@contextmanager
def receiver(arrivals: Arrivals) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            at = time.time()
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(204)
            self.end_headers()
            arrivals.add(at, json.loads(body))

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(url: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@contextmanager
def trimtab_server(db_url: str, workdir: Path) -> Iterator[str]:
    port = free_port()
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - the subprocess writes it
    cmd = [sys.executable, "-m", "trimtab.cli", "server", "--port", str(port), "--db", db_url, "--no-auth"]
    cmd.append("--auto-upgrade")  # creates the schema on a fresh database
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {(workdir / 'server.log').read_text()}")
            try:
                request(url + "/readyz")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("server not ready in 60 s") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@contextmanager
def fresh_pg(url: str) -> Iterator[str]:
    """A new database next to the one ``url`` names, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(url.replace("postgresql+psycopg://", "postgresql://"))
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"trimtab_latency_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def stored(server: str, run_id: int | None) -> int:
    if run_id is None:
        return -1
    try:
        return int(request(f"{server}/api/v1/runs/{run_id}")["n_points"])
    except OSError:
        return -1


def measure(server: str, arrivals: Arrivals, spool: Path, n_runs: int) -> list[tuple[float, float]]:
    """(total latency, part until the alert was committed) per run, in seconds."""
    import trimtab

    results = []
    for i in range(n_runs):
        name = f"latency-{i}-{uuid.uuid4().hex[:6]}"
        run = trimtab.init(server=server, project="latency", name=name, spool_dir=str(spool), replay_orphans=False)
        for step in range(5):
            run.log({"loss": 2.0 - 0.1 * step}, step=step)
        deadline = time.monotonic() + 30
        while stored(server, run.id) < 5:
            if time.monotonic() > deadline:
                raise SystemExit(f"run {name}: warm-up points not stored in 30 s")
            time.sleep(0.02)
        logged_at = time.time()
        run.log({"loss": math.nan}, step=5)
        got = arrivals.wait(name, DELIVERY_WAIT_S)
        run.finish(timeout=30)
        if got is None:
            print(f"run {name}: no webhook within {DELIVERY_WAIT_S:.0f} s", file=sys.stderr)
            raise SystemExit(1)
        arrived_at, alert = got
        fired_at = datetime.fromisoformat(alert["fired_at"]).timestamp()
        results.append((arrived_at - logged_at, fired_at - logged_at))
        print(f"  run {i + 1:3d}/{n_runs}: {1000 * (arrived_at - logged_at):7.1f} ms", flush=True)
    return results


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def report(results: list[tuple[float, float]]) -> bool:
    total = [t for t, _ in results]
    until_alert = [a for _, a in results]
    delivery = [t - a for t, a in results]
    print()
    print(f"{'ms (n=' + str(len(results)) + ')':<54} {'p50':>8} {'p95':>8} {'max':>8}")
    rows = [
        ("log(NaN) -> webhook received (total)", total),
        ("  log(NaN) -> alert opened (agent, ingest, rules)", until_alert),
        ("  alert opened -> webhook received (commit, outbox)", delivery),
    ]
    for label, values in rows:
        print(
            f"{label:<54} {1000 * statistics.median(values):8.1f} {1000 * quantile(values, 0.95):8.1f} "
            f"{1000 * max(values):8.1f}"
        )
    p95 = quantile(total, 0.95)
    ok = p95 <= P95_TARGET_S
    print(f"\np95 {1000 * p95:.0f} ms, target <= {1000 * P95_TARGET_S:.0f} ms: {'met' if ok else 'MISSED'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--pg-url", help="a PostgreSQL database to run the server on (default: a SQLite file)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the p95 target is missed")
    args = parser.parse_args()
    arrivals = Arrivals()
    with tempfile.TemporaryDirectory(prefix="trimtab-latency-") as tmp:
        workdir = Path(tmp)
        with ExitStack() as stack:
            db_url = (
                stack.enter_context(fresh_pg(args.pg_url)) if args.pg_url else f"sqlite:///{workdir / 'trimtab.db'}"
            )
            hook = stack.enter_context(receiver(arrivals))
            server = stack.enter_context(trimtab_server(db_url, workdir))
            sink = request(f"{server}/api/v1/sinks", {"kind": "webhook", "url": hook, "project": "latency"})
            print(f"server {server} ({'PostgreSQL' if args.pg_url else 'SQLite'}), webhook sink {sink['id']} -> {hook}")
            ok = report(measure(server, arrivals, workdir / "spool", args.runs))
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
