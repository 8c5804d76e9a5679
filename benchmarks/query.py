"""Scalar query benchmark: a 2,000-point view of a 1,000,000-step series, from the rollups vs
reading every point.

For each backend, in one run: a fresh database, one run with one key of N steps (a slow
wave with a few spikes and NaNs), ingested through the real ``IngestWriter`` in batches of
16,384 points (so the rollups are built as in production). Then, each timed ``--repeats``
times (median and p95, server time: the REST handler's body function, JSON included):

(a) raw read: ``Store.scalar_rows`` of the whole series;
(b) the old path: raw read + ``select_indices`` (below) to 2,000 points;
(c) the new full-range view: ``api._scalars_body`` with max_points=2000;
(d) zoomed views of 100k, 10k and 1k steps around a spike (same body function);
(e) the dashboard's chart: the full-range view parsed, built into the overview figure
    (``dashboard.figures``) and serialised to JSON, as a callback does.

Every view is checked to hold every spike and NaN in its range and at most 2,000 points. The
table prints the ratio raw / view. Target: (c) <= 100 ms on both backends.

    .venv/bin/python benchmarks/query.py                  # both backends, 1,000,000 steps
    .venv/bin/python benchmarks/query.py --backend sqlite --steps 200000

PostgreSQL: ``--pg-url`` (default postgresql+psycopg://postgres@127.0.0.1:5432/test) names
a database the script connects to in order to CREATE and DROP its own database.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BATCH = 16_384
VIEW_POINTS = 2000
TARGET_MS = 100.0


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def series(n: int) -> tuple[list[float], dict[int, float]]:
    """Values of steps 0..n-1 and the special ones (spikes and NaNs) by step."""
    values = [1.0 + 0.5 * math.sin(s / 5000.0) + (s % 7) * 1e-3 for s in range(n)]
    special = {n // 7: 1e6, n // 3 + 11: -1e6, (2 * n) // 3 + 5: 5e5, n // 5 + 3: math.nan, (4 * n) // 5 + 1: math.nan}
    for step, value in special.items():
        values[step] = value
    return values, special


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(median ms, p95 ms, last result) of ``repeats`` calls after one warm-up."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)], result


def check_view(body: bytes, special: dict[int, float], lo: int, hi: int) -> None:
    data = json.loads(body)
    assert len(data["steps"]) <= VIEW_POINTS, len(data["steps"])
    got = dict(zip(data["steps"], data["values"], strict=True))
    for step, value in special.items():
        if lo <= step <= hi:
            want = "NaN" if math.isnan(value) else value
            assert got.get(step) == want, f"step {step}: {got.get(step)!r} != {want!r}"


# The old path, kept as the baseline: equal-width buckets over the raw points, each keeping
# its finite minimum and maximum and its first NaN, +Inf and -Inf, in Python.
def select_indices(steps: Sequence[int], values: Sequence[float], max_points: int) -> list[int]:
    """Indices of the points to keep, ascending. ``steps`` must be sorted ascending."""
    n = len(steps)
    if n <= max_points:
        return list(range(n))
    buckets = max(1, max_points // 2)
    while True:
        keep = _select(steps, values, buckets)
        if len(keep) <= max_points or buckets == 1:
            return keep[:max_points]
        buckets = max(1, min(buckets - 1, int(buckets * max_points / len(keep))))


def _select(steps: Sequence[int], values: Sequence[float], buckets: int) -> list[int]:
    n = len(steps)
    first, last = steps[0], steps[-1]
    width = (last - first + 1) / buckets
    keep: list[int] = []
    i = 0
    while i < n:
        bucket = int((steps[i] - first) / width)
        lo_i = hi_i = -1
        lo = hi = 0.0
        markers: dict[str, int] = {}
        j = i
        while j < n and int((steps[j] - first) / width) == bucket:
            v = values[j]
            if v != v or v in (math.inf, -math.inf):
                kind = "nan" if v != v else ("pinf" if v > 0 else "ninf")
                markers.setdefault(kind, j)
            else:
                if lo_i < 0 or v < lo:
                    lo, lo_i = v, j
                if hi_i < 0 or v > hi:
                    hi, hi_i = v, j
            j += 1
        chosen = {k for k in (lo_i, hi_i) if k >= 0}
        chosen.update(markers.values())
        keep.extend(sorted(chosen))
        i = j
    return keep


def bench(name: str, db_url: str, n: int, repeats: int) -> list[tuple[str, float, float]]:
    from trimtab.dashboard import figures
    from trimtab.dashboard.client import Series
    from trimtab.jsonsafe import float_from_json
    from trimtab.protocol import Batch, Hello, RunRef, ScalarSeries
    from trimtab.server.api import runs as api
    from trimtab.server.db import migrate
    from trimtab.server.db.engine import make_engine
    from trimtab.server.db.store import Store
    from trimtab.server.ingest import STORED, IngestWriter

    migrate.upgrade(db_url)
    engine = make_engine(db_url)
    try:
        store = Store(engine)
        run_id, _ = store.open_run(
            Hello(RunRef(f"bench-{uuid.uuid4().hex}", "bench", "query"), 1, "0", "h", 1, 0, 1, {})
        )
        values, special = series(n)
        writer = IngestWriter(store)
        writer.start()
        t0 = time.perf_counter()
        try:
            futures = []
            for seq, i in enumerate(range(0, n, BATCH), start=1):
                steps = array("q", range(i, min(n, i + BATCH)))
                walls = array("d", [1.7e9 + s * 0.1 for s in steps])
                futures.append(
                    writer.submit(
                        run_id, 0, Batch(seq, [ScalarSeries("loss", steps, walls, array("d", values[i : i + BATCH]))])
                    )
                )
            assert all(f.result(600) == STORED for f in futures)
        finally:
            writer.stop()
        say(f"[{name}] ingested {n:,} points with rollups in {time.perf_counter() - t0:.1f}s")

        ctx: Any = SimpleNamespace(store=store)
        rows: list[tuple[str, float, float]] = []

        def raw() -> Any:
            return store.scalar_rows(run_id, "loss", None, None)

        def old() -> Any:
            r = raw()
            return select_indices(r.steps, r.values, VIEW_POINTS)

        for label, fn in (("raw read, all points", raw), ("old: raw read + Python downsample", old)):
            med, p95, _ = timed(fn, max(3, repeats // 4))
            rows.append((label, med, p95))
            say(f"[{name}] {label}: median {med:.1f} ms, p95 {p95:.1f} ms")
        centre = max(s for s, v in special.items() if v == 1e6)
        windows: list[tuple[str, int | None, int | None]] = [("view, full range", None, None)]
        windows += [
            (f"view, {w:,}-step zoom", centre - w // 2 + 3, centre + w // 2 + 2) for w in (100_000, 10_000, 1000)
        ]
        for label, lo, hi in windows:

            def view(lo: int | None = lo, hi: int | None = hi) -> bytes:
                return api._scalars_body(ctx, run_id, "loss", lo, hi, VIEW_POINTS, 0)

            med, p95, body = timed(view, repeats)
            check_view(body, special, 0 if lo is None else lo, n if hi is None else hi)
            rows.append((label, med, p95))
            say(f"[{name}] {label}: median {med:.2f} ms, p95 {p95:.2f} ms ({len(json.loads(body)['steps'])} points)")

        def chart() -> Any:
            """What the dashboard's server does for the chart: the view, parsed, as a figure, as JSON."""
            body = json.loads(api._scalars_body(ctx, run_id, "loss", None, None, VIEW_POINTS, 0))
            view = Series("loss", body["steps"], [float_from_json(v) for v in body["values"]], body["total_points"])
            return figures.overview_figure([figures.Panel("loss", [view])], []).to_json()

        med, p95, _ = timed(chart, repeats)
        rows.append(("chart: view + Plotly figure + JSON", med, p95))
        say(f"[{name}] chart: median {med:.2f} ms, p95 {p95:.2f} ms")
        return rows
    finally:
        engine.dispose()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--pg-url", default=os.environ.get("TRIMTAB_BENCH_PG_URL", DEFAULT_PG_URL))
    args = p.parse_args(argv)
    results: dict[str, list[tuple[str, float, float]]] = {}
    for name in ["sqlite", "postgres"] if args.backend == "both" else [args.backend]:
        if name == "sqlite":
            workdir = Path(tempfile.mkdtemp(prefix="trimtab-bench-query-"))
            try:
                results[name] = bench(name, f"sqlite:///{workdir / 'trimtab.db'}", args.steps, args.repeats)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            continue
        import psycopg
        from sqlalchemy.engine import make_url

        base = make_url(args.pg_url)
        admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
        db = f"trimtab_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')
        try:
            results[name] = bench(
                name, base.set(database=db).render_as_string(hide_password=False), args.steps, args.repeats
            )
        finally:
            with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    print()
    print(
        f"trimtab query benchmark: {args.steps:,} steps, one key, {VIEW_POINTS}-point views; "
        f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}"
    )
    ok = True
    for name, rows in results.items():
        raw_ms = rows[0][1]
        header = f"{name:<9} {'query':<36} {'median ms':>10} {'p95 ms':>9} {'raw / this':>11}"
        print(header)
        print("-" * len(header))
        for label, med, p95 in rows:
            print(f"{'':<9} {label:<36} {med:>10.2f} {p95:>9.2f} {raw_ms / med:>10.1f}x")
        full = rows[2][1]
        ok &= full <= TARGET_MS
        verdict = "PASS" if full <= TARGET_MS else "MISS"
        print(f"{'':<9} full-range view {full:.1f} ms, target <= {TARGET_MS:.0f} ms: {verdict}")
        print()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
