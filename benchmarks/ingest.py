"""Ingest benchmark: how close does trimtab's end-to-end path come to the raw driver limit?

For each backend, in one run:

(a) raw driver limit: rows/s into a freshly created ``scalar_points`` table (the same
    SQLAlchemy table definition, so the same columns and the same ``(key_id, step)`` index)
    with nothing but the driver: sqlite3 ``executemany`` (WAL, synchronous=NORMAL) or psycopg
    binary ``COPY`` + ``write_row``, in chunks of 16384 rows with one commit per chunk. Only
    the insert and the commit are timed; building the rows is not.
(b) end to end: a real ``trimtab server`` subprocess on a fresh database, N agent
    subprocesses (each ``trimtab.init`` + P points over K keys with distinct steps, as fast
    as it can, then ``finish()``). The clock starts when every agent has imported trimtab and
    is released at once (interpreter start-up is not ingest), and stops when the last
    agent's ``finish()`` has returned True. The runs' ``n_points`` from ``GET /api/v1/runs``
    must add up to N * P (and the rows in ``scalar_points`` too), or the script fails.
(c) a table: backend, raw rows/s, end-to-end points/s, their ratio and the target (>= 0.60).

It also times ``run.log`` on the calling thread: a tight loop logging a prebuilt dict of 8
floats to a running server, reported in microseconds per scalar (target <= 5 us).

    .venv/bin/python benchmarks/ingest.py                       # both backends, defaults
    .venv/bin/python benchmarks/ingest.py --backend sqlite --agents 2 --points 100000

PostgreSQL: ``--pg-url`` (default ``$TRIMTAB_BENCH_PG_URL`` or
``postgresql://postgres@127.0.0.1:5432/test``) names a database the script connects to in
order to CREATE and DROP its own ``trimtab_bench_<random>`` databases.

Exit status: 0 when every verification passed (targets missed are reported, and fail the
run only with ``--strict``), 1 when a verification failed, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RAW_CHUNK_ROWS = 16384
RATIO_TARGET = 0.60
LOG_COST_TARGET_US = 5.0
LOG_COST_KEYS = 8
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
REPO = Path(__file__).resolve().parent.parent


class VerificationError(Exception):
    """Points lost, an agent failing, a count that does not add up."""


class SetupError(Exception):
    """The server would not start, PostgreSQL is unreachable, and the like."""


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


# =================================================================== agent worker (subprocess)


def agent_worker(argv: list[str]) -> int:
    """One agent process: import, say ready, wait for "go", log, finish, report JSON on stdout."""
    p = argparse.ArgumentParser(prog="ingest.py --agent-worker")
    p.add_argument("--server", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--spool-dir", required=True)
    p.add_argument("--points", type=int, required=True)
    p.add_argument("--keys", type=int, required=True)
    p.add_argument("--finish-timeout", type=float, required=True)
    args = p.parse_args(argv)

    import trimtab

    keys = [f"bench/k{j:03d}" for j in range(args.keys)]
    steps = args.points // args.keys
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    if sys.stdin.readline().strip() != "go":
        return 3

    t_start = time.time()
    # The queue must hold every log() call: this loop logs far faster than any training loop,
    # and the benchmark measures the pipeline's throughput, not the designed drop-when-full.
    run = trimtab.init(
        server=args.server,
        project=args.project,
        name=args.name,
        spool_dir=args.spool_dir,
        max_queue=max(200_000, steps + 1),
    )
    fromkeys = dict.fromkeys
    log = run.log
    for step in range(steps):
        log(fromkeys(keys, step * 0.5), step=step)
    t_logged = time.time()
    ok = run.finish(timeout=args.finish_timeout)
    t_end = time.time()
    stats = run.stats()
    result = {
        "ok": ok,
        "uid": run.uid,
        "run_id": run.id,
        "points": steps * args.keys,
        "t_start": t_start,
        "t_logged": t_logged,
        "t_end": t_end,
        "drops": stats["drops"],
        "unacked_batches": stats["unacked_batches"],
    }
    out.write("result " + json.dumps(result) + "\n")
    out.flush()
    return 0 if ok else 1


# =================================================================== helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def log_tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    | " + line for line in lines[-n:])


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: only ever the process this script started."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except ProcessLookupError:
        pass


def trimtab_cli() -> list[str]:
    exe = Path(sys.executable).with_name("trimtab")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "trimtab.cli"]


@dataclass
class Backend:
    name: str
    server_url: str = ""  # database URL for the trimtab server
    raw_sqlite_path: Path | None = None
    raw_pg_url: str = ""  # psycopg conninfo for the raw table
    cleanup: list[Any] = field(default_factory=list)


class PgAdmin:
    """Creates and drops this run's own databases through an admin connection URL."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self.base = make_url(url.replace("postgresql+psycopg://", "postgresql://", 1))
        self.admin = self.base.render_as_string(hide_password=False)
        self.created: list[str] = []

    def create(self, name: str) -> str:
        import psycopg

        try:
            with psycopg.connect(self.admin, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.Error as exc:
            raise SetupError(f"cannot create database {name} via {self._safe()}: {exc}") from exc
        self.created.append(name)
        return self.base.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        import psycopg

        while self.created:
            name = self.created.pop()
            try:
                with psycopg.connect(self.admin, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                say(f"[postgres] dropped database {name}")
            except Exception as exc:  # keep cleaning the rest
                print(f"WARNING: could not drop database {name}: {exc}", file=sys.stderr)

    def checkpoint(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.admin, autocommit=True, connect_timeout=10) as conn:
                conn.execute("CHECKPOINT")
        except Exception:
            pass  # needs superuser (or pg_checkpoint); only evens out the two measurements

    def _safe(self) -> str:
        return self.base.render_as_string(hide_password=True)


# =================================================================== (a) raw driver limit


def raw_rows(n_rows: int, n_series: int, keys_per_series: int) -> Any:
    """Chunks of RAW_CHUNK_ROWS rows shaped like ingest: each chunk is one agent's batch, its
    rows key after key with consecutive steps; agents take turns, as batches arrive."""
    steps_per_chunk = max(1, RAW_CHUNK_ROWS // keys_per_series)
    next_step = [0] * n_series
    produced, series, wall = 0, 0, time.time()
    while produced < n_rows:
        base_key = 1 + series * keys_per_series
        s0 = next_step[series]
        chunk: list[tuple[int, int, float, float]] = []
        for k in range(keys_per_series):
            key_id = base_key + k
            chunk.extend((key_id, s, wall + s * 1e-3, s * 0.5) for s in range(s0, s0 + steps_per_chunk))
        chunk = chunk[: n_rows - produced]
        next_step[series] = s0 + steps_per_chunk
        produced += len(chunk)
        series = (series + 1) % n_series
        yield chunk


def create_raw_table(sqlalchemy_url: str) -> None:
    from sqlalchemy import create_engine

    from trimtab.server.db.tables import scalar_points

    engine = create_engine(sqlalchemy_url)
    try:
        scalar_points.create(engine)  # the server's own table definition, index included
    finally:
        engine.dispose()


def raw_sqlite(path: Path, n_rows: int, n_series: int, keys: int) -> tuple[float, int]:
    import sqlite3

    create_raw_table(f"sqlite:///{path}")
    conn = sqlite3.connect(str(path))
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        sql = "INSERT INTO scalar_points (key_id, step, wall_time, value) VALUES (?, ?, ?, ?)"
        busy, done = 0.0, 0
        for chunk in raw_rows(n_rows, n_series, keys):
            t0 = time.perf_counter()
            conn.executemany(sql, chunk)
            conn.commit()
            busy += time.perf_counter() - t0
            done += len(chunk)
        (count,) = conn.execute("SELECT count(*) FROM scalar_points").fetchone()
    finally:
        conn.close()
    return busy, count


def raw_postgres(conninfo: str, n_rows: int, n_series: int, keys: int) -> tuple[float, int]:
    import psycopg

    create_raw_table(conninfo.replace("postgresql://", "postgresql+psycopg://", 1))
    busy = 0.0
    with psycopg.connect(conninfo) as conn:
        for chunk in raw_rows(n_rows, n_series, keys):
            t0 = time.perf_counter()
            with (
                conn.cursor() as cur,
                cur.copy("COPY scalar_points (key_id, step, wall_time, value) FROM STDIN (FORMAT BINARY)") as copy,
            ):
                copy.set_types(["int4", "int8", "float8", "float8"])
                for row in chunk:
                    copy.write_row(row)
            conn.commit()
            busy += time.perf_counter() - t0
        (count,) = conn.execute("SELECT count(*) FROM scalar_points").fetchone()  # type: ignore[misc]
    return busy, count


# =================================================================== (b) end to end


class Server:
    def __init__(self, db_url: str, workdir: Path, tag: str) -> None:
        self.db_url = db_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        self.tag = tag
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        cmd = [*trimtab_cli(), "server", "--port", str(self.port), "--db", self.db_url, "--no-auth", "--auto-upgrade"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(f"server exited with {self.proc.returncode}:\n{log_tail(self.log_path)}")
            try:
                http_get_json(self.url + "/readyz", timeout=2)
                return
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.1)
        raise SetupError(f"server not ready within {timeout:.0f}s:\n{log_tail(self.log_path)}")

    def runs(self, project: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = http_get_json(f"{self.url}/api/v1/runs?project={project}&limit=1000&offset={offset}")
            out.extend(page)
            if len(page) < 1000:
                return out
            offset += len(page)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def run_agents(
    tag: str, server: Server, workdir: Path, project: str, n_agents: int, points: int, keys: int, timeout: float
) -> tuple[float, list[dict[str, Any]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(n_agents):
            spool = workdir / f"spool-{i}"
            spool.mkdir()
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--agent-worker",
                "--server",
                server.url,
                "--project",
                project,
                "--name",
                f"agent-{i}",
                "--spool-dir",
                str(spool),
                "--points",
                str(points),
                "--keys",
                str(keys),
                "--finish-timeout",
                str(timeout),
            ]
            stderr = open(workdir / f"agent-{i}.log", "w")  # noqa: SIM115 - closed below
            try:
                procs.append(
                    subprocess.Popen(
                        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=str(REPO)
                    )
                )
            finally:
                stderr.close()
        for i, proc in enumerate(procs):
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise SetupError(f"agent {i} did not start ({line!r}):\n{log_tail(workdir / f'agent-{i}.log')}")
        say(f"[{tag}] {n_agents} agents imported trimtab; releasing them")

        t0 = time.time()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        deadline = time.monotonic() + timeout + 30
        last_report = time.monotonic()
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise VerificationError(
                    f"agents still running {timeout + 30:.0f}s after release (hang?); "
                    f"server log:\n{log_tail(server.log_path)}"
                )
            if server.proc is not None and server.proc.poll() is not None:
                raise VerificationError(f"server died during ingest:\n{log_tail(server.log_path)}")
            if time.monotonic() - last_report >= 5:
                done = sum(p.poll() is not None for p in procs)
                say(f"[{tag}] ... {time.time() - t0:5.1f}s, {done}/{n_agents} agents done")
                last_report = time.monotonic()
            time.sleep(0.05)

        results: list[dict[str, Any]] = []
        failures: list[str] = []
        for i, proc in enumerate(procs):
            assert proc.stdout is not None
            text = proc.stdout.read()
            res = None
            for line in text.splitlines():
                if line.startswith("result "):
                    res = json.loads(line[len("result ") :])
            if res is None:
                failures.append(
                    f"agent {i} exited {proc.returncode} without a result:\n{log_tail(workdir / f'agent-{i}.log')}"
                )
                continue
            results.append(res)
            if not res["ok"]:
                failures.append(
                    f"agent {i} finish() returned False (unacked batches {res['unacked_batches']}, "
                    f"drops {res['drops']}):\n{log_tail(workdir / f'agent-{i}.log')}"
                )
            elif res["drops"]:
                failures.append(f"agent {i} reports dropped points {res['drops']}")
        if failures:
            raise VerificationError("\n".join(failures))
        elapsed = max(r["t_end"] for r in results) - t0
        return elapsed, results
    finally:
        for proc in procs:
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with suppress(OSError):
                        stream.close()
            stop_process(proc, grace=5)


def count_rows(db_url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM scalar_points")).scalar_one())
    finally:
        engine.dispose()


def verify_runs(tag: str, server: Server, project: str, results: list[dict[str, Any]], expected: int) -> int:
    runs = server.runs(project)
    uids = {r["uid"] for r in results}
    ours = [r for r in runs if r["uid"] in uids]
    total = sum(int(r["n_points"]) for r in ours)
    per_run = {r["name"]: int(r["n_points"]) for r in ours}
    say(f"[{tag}] GET /api/v1/runs: {len(ours)}/{len(results)} runs, n_points sum {total:,} (expected {expected:,})")
    problems = []
    if len(ours) != len(results):
        problems.append(f"the server lists {len(ours)} of the {len(results)} runs")
    if total != expected:
        problems.append(f"n_points add up to {total:,}, expected {expected:,} (lost {expected - total:,})")
    for res in results:
        match = [r for r in ours if r["uid"] == res["uid"]]
        if match and int(match[0]["n_points"]) != res["points"]:
            problems.append(f"run {match[0]['name']}: n_points {match[0]['n_points']:,}, logged {res['points']:,}")
    if problems:
        raise VerificationError(f"[{tag}] VERIFICATION FAILED: " + "; ".join(problems) + f"; per run {per_run}")
    return total


# =================================================================== log() cost


def measure_log_cost(server_url: str, spool: Path, calls: int, repeats: int) -> tuple[float, float, int]:
    """Microseconds per scalar of run.log({8 floats}, step=i) on this (the training) thread."""
    import trimtab

    run = trimtab.init(
        server=server_url,
        project="bench-logcost",
        name="log-cost",
        spool_dir=str(spool),
        max_queue=max(200_000, calls * (repeats + 1) + 1),
    )
    try:
        run.wait_for_id(10)
        data = {f"train/m{j}": 0.25 * j for j in range(LOG_COST_KEYS)}
        log = run.log
        step = 0
        for _ in range(min(calls, 2000)):  # warm-up
            log(data, step=step)
            step += 1
        per_scalar: list[float] = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(step, step + calls):
                log(data, step=i)
            dt = time.perf_counter() - t0
            step += calls
            per_scalar.append(dt / (calls * LOG_COST_KEYS) * 1e6)
            time.sleep(0.3)  # let the sender drain between repeats
    finally:
        ok = run.finish(timeout=60)
    if not ok:
        raise VerificationError(f"log-cost run: finish() returned False (stats {run.stats()})")
    return statistics.median(per_scalar), min(per_scalar), step * LOG_COST_KEYS


# =================================================================== driver


@dataclass
class Result:
    backend: str
    raw_rows_s: float
    e2e_points_s: float
    e2e_seconds: float
    log_phase_s: float
    total_points: int

    @property
    def ratio(self) -> float:
        return self.e2e_points_s / self.raw_rows_s if self.raw_rows_s else 0.0


def bench_backend(name: str, args: argparse.Namespace, stack: ExitStack) -> tuple[Result, tuple[float, float] | None]:
    tag = name
    workdir = Path(tempfile.mkdtemp(prefix=f"trimtab-bench-{name}-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    total = args.agents * args.points
    suffix = uuid.uuid4().hex[:10]

    pg: PgAdmin | None = None
    if name == "postgres":
        pg = PgAdmin(args.pg_url)
        stack.callback(pg.drop_all)

    # (a) raw driver limit
    raw_n = args.raw_rows or total
    say(f"[{tag}] raw driver limit: {raw_n:,} rows, chunks of {RAW_CHUNK_ROWS} rows, a commit per chunk")
    if name == "sqlite":
        busy, count = raw_sqlite(workdir / "raw.db", raw_n, args.agents, args.keys)
        (workdir / "raw.db").unlink(missing_ok=True)
    else:
        assert pg is not None
        raw_url = pg.create(f"trimtab_bench_{suffix}_raw")
        busy, count = raw_postgres(raw_url, raw_n, args.agents, args.keys)
        pg.drop_all()
        pg.checkpoint()
    if count != raw_n:
        raise VerificationError(f"[{tag}] raw table holds {count:,} rows, inserted {raw_n:,}")
    raw_rate = raw_n / busy
    say(f"[{tag}] raw: {raw_n:,} rows in {busy:.2f}s = {fmt_rate(raw_rate)} rows/s")

    # (b) end to end
    if name == "sqlite":
        db_url = f"sqlite:///{workdir / 'trimtab.db'}"
    else:
        assert pg is not None
        db_url = pg.create(f"trimtab_bench_{suffix}").replace("postgresql://", "postgresql+psycopg://", 1)
    server = Server(db_url, workdir, tag)
    stack.callback(server.stop)
    say(f"[{tag}] starting trimtab server on port {server.port}")
    server.start()
    project = f"bench-{suffix}"
    say(f"[{tag}] end to end: {args.agents} agents x {args.points:,} points over {args.keys} keys = {total:,} points")
    elapsed, results = run_agents(
        tag, server, workdir, project, args.agents, args.points, args.keys, args.finish_timeout
    )
    e2e_rate = total / elapsed
    t0 = min(r["t_start"] for r in results)
    log_phase = max(r["t_logged"] for r in results) - t0
    say(
        f"[{tag}] all {args.agents} finish() returned True: {total:,} points in {elapsed:.2f}s "
        f"= {fmt_rate(e2e_rate)} points/s (log loops done after {log_phase:.2f}s)"
    )
    verify_runs(tag, server, project, results, total)
    rows = count_rows(db_url)
    say(f"[{tag}] scalar_points holds {rows:,} rows")
    if rows != total:
        raise VerificationError(f"[{tag}] VERIFICATION FAILED: scalar_points holds {rows:,} rows, expected {total:,}")

    log_cost = None
    if not args.skip_log_cost:
        spool = workdir / "spool-logcost"
        spool.mkdir()
        say(f"[{tag}] log() cost: {args.log_repeats} x {args.log_calls:,} calls of run.log({{{LOG_COST_KEYS} floats}})")
        median, best, n_scalars = measure_log_cost(server.url, spool, args.log_calls, args.log_repeats)
        lc_runs = server.runs("bench-logcost")
        stored = sum(int(r["n_points"]) for r in lc_runs)
        if stored != n_scalars:
            raise VerificationError(f"[{tag}] log-cost run: server stored {stored:,} of {n_scalars:,} scalars")
        say(f"[{tag}] log(): median {median:.3f} us/scalar (best {best:.3f}); all {n_scalars:,} scalars stored")
        log_cost = (median, best)

    server.stop()
    return Result(name, raw_rate, e2e_rate, elapsed, log_phase, total), log_cost


def print_table(results: list[Result], log_costs: dict[str, tuple[float, float]], args: argparse.Namespace) -> bool:
    ok = True
    print()
    print(
        f"trimtab ingest benchmark: {args.agents} agents x {args.points:,} points, {args.keys} keys/agent; "
        f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}"
    )
    header = f"{'backend':<9} {'raw rows/s':>12} {'end-to-end pts/s':>17} {'ratio':>7} {'target':>8}  result"
    print(header)
    print("-" * len(header))
    for r in results:
        met = r.ratio >= RATIO_TARGET
        ok &= met
        print(
            f"{r.backend:<9} {fmt_rate(r.raw_rows_s):>12} {fmt_rate(r.e2e_points_s):>17} {r.ratio:>7.2f} "
            f"{'>= ' + format(RATIO_TARGET, '.2f'):>8}  {'PASS' if met else 'MISS'}"
        )
    if log_costs:
        print()
        header = f"{'backend':<9} {'log() us/scalar (median)':>25} {'best':>7} {'target':>8}  result"
        print(header)
        print("-" * len(header))
        for backend, (median, best) in log_costs.items():
            met = median <= LOG_COST_TARGET_US
            ok &= met
            print(
                f"{backend:<9} {median:>25.3f} {best:>7.3f} {'<= ' + format(LOG_COST_TARGET_US, '.1f'):>8}  "
                f"{'PASS' if met else 'MISS'}"
            )
    print()
    return ok


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--agents", type=int, default=4, help="agent processes (default 4)")
    p.add_argument("--points", type=int, default=2_000_000, help="points per agent (default 2000000)")
    p.add_argument("--keys", type=int, default=8, help="keys per agent; points are spread over them (default 8)")
    p.add_argument("--raw-rows", type=int, default=0, help="rows for the raw measurement (default agents*points)")
    p.add_argument(
        "--pg-url",
        default=os.environ.get("TRIMTAB_BENCH_PG_URL", DEFAULT_PG_URL),
        help=f"admin URL used to create/drop the bench databases (default {DEFAULT_PG_URL})",
    )
    p.add_argument("--finish-timeout", type=float, default=300.0, help="each agent's finish(timeout=...)")
    p.add_argument("--log-calls", type=int, default=20_000, help="log() calls per timing repeat (default 20000)")
    p.add_argument("--log-repeats", type=int, default=5)
    p.add_argument("--skip-log-cost", action="store_true")
    p.add_argument("--strict", action="store_true", help="also exit 1 when a target is missed")
    args = p.parse_args(argv)
    if args.agents < 1 or args.keys < 1 or args.points < args.keys:
        p.error("need --agents >= 1, --keys >= 1 and --points >= --keys")
    if args.points % args.keys:
        p.error(f"--points ({args.points}) must be a multiple of --keys ({args.keys})")
    return args


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--agent-worker"]:
        return agent_worker(argv[1:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM cleans up like Ctrl-C
    try:
        import trimtab.server.db.tables  # noqa: F401
    except ImportError as exc:
        print(f"cannot import trimtab with its server extra ({exc}); run with the venv's python", file=sys.stderr)
        return 2
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    results: list[Result] = []
    log_costs: dict[str, tuple[float, float]] = {}
    try:
        for name in backends:
            with ExitStack() as stack:  # servers, agents, temp dirs and databases go even on error
                result, log_cost = bench_backend(name, args, stack)
            results.append(result)
            if log_cost is not None:
                log_costs[name] = log_cost
    except VerificationError as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr, flush=True)
        if results:
            print_table(results, log_costs, args)
        return 1
    except SetupError as exc:
        print(f"\nSETUP ERROR: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 130
    met = print_table(results, log_costs, args)
    return 1 if (args.strict and not met) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
