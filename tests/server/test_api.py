"""The REST API against a real server fed by a real agent."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import trimtab
from tests.helpers import ServerProcess, api_status
from trimtab.jsonsafe import float_from_json


def _stream(server: ServerProcess, tmp_path: Path, name: str, project: str = "api", **options: Any) -> trimtab.Run:
    return trimtab.init(
        server=server.url, project=project, name=name, spool_dir=str(tmp_path / name), replay_orphans=False, **options
    )


def test_runs_list_detail_and_project_filter(server: ServerProcess, tmp_path: Path) -> None:
    with _stream(server, tmp_path, "a", config={"lr": 3e-4, "layers": [4, 4]}) as a:
        a.log({"loss": 1.0}, step=7)
    with _stream(server, tmp_path, "b", project="other") as b:
        b.log({"loss": 2.0}, step=0)
    runs = server.get("/api/v1/runs")
    assert [r["name"] for r in runs] == ["b", "a"]  # newest first
    assert [r["name"] for r in server.get("/api/v1/runs?project=api")] == ["a"]
    detail = server.get(f"/api/v1/runs/{a.id}")
    assert detail["status"] == "finished" and detail["last_step"] == 7 and detail["n_points"] == 1
    assert detail["config"] == {"lr": 3e-4, "layers": [4, 4]}
    assert detail["created_at"].endswith("+00:00")
    assert server.get("/api/v1/runs?limit=1&offset=1")[0]["name"] == "a"


def test_a_config_with_infinities_is_stored_and_read_back_as_floats(
    server: ServerProcess, tmp_path: Path, migrated_db: str
) -> None:
    from trimtab.server.db.engine import make_engine
    from trimtab.server.db.store import Store

    config = {"clip": math.inf, "floor": -math.inf, "ema": {"init": math.nan}, "name\x00": "gpt"}
    with _stream(server, tmp_path, "inf", config=config) as run:
        run.log({"loss": 1.0}, step=0)
    shown = server.get(f"/api/v1/runs/{run.id}")["config"]
    assert shown == {"clip": "Infinity", "floor": "-Infinity", "ema": {"init": "NaN"}, "name": "gpt"}
    engine = make_engine(migrated_db)
    assert run.id is not None
    try:
        stored = Store(engine).get_run(run.id)["config"]
    finally:
        engine.dispose()
    assert stored["clip"] == math.inf and stored["floor"] == -math.inf and math.isnan(stored["ema"]["init"])


def test_drops_are_reported_to_the_server(server: ServerProcess, tmp_path: Path) -> None:
    run = _stream(server, tmp_path, "droppy", max_queue=5, flush_interval=3600)
    for step in range(50):
        run.log({"loss": float(step)}, step=step)
    run.log({"text": "nope"}, step=50)
    assert run.finish(timeout=30) is True
    assert server.get(f"/api/v1/runs/{run.id}")["drops"] == {"queue_full": 45, "bad_value": 1}


def test_keys_and_incremental_reads(server: ServerProcess, tmp_path: Path) -> None:
    with _stream(server, tmp_path, "inc") as run:
        for step in range(100):
            run.log({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    keys = server.get(f"/api/v1/runs/{run.id}/keys")
    assert keys == [
        {"key": "loss", "kind": "scalar", "rank": 0, "count": 100, "last_step": 99},
        {"key": "lr", "kind": "scalar", "rank": 0, "count": 100, "last_step": 99},
    ]
    tail = server.get(f"/api/v1/runs/{run.id}/scalars?key=loss&since_step=94")
    assert tail["steps"] == [95, 96, 97, 98, 99]
    window = server.get(f"/api/v1/runs/{run.id}/scalars?key=loss&since_step=9&end_step=12")
    assert window["steps"] == [10, 11, 12]
    assert window["values"] == [1.0 / 11, 1.0 / 12, 1.0 / 13]
    assert (window["bucket_steps"], window["downsampled"], window["total_points"]) == (1, False, 3)
    # start_step is inclusive; with since_step too, the later bound wins
    assert server.get(f"/api/v1/runs/{run.id}/scalars?key=loss&start_step=10&end_step=12")["steps"] == [10, 11, 12]
    both = server.get(f"/api/v1/runs/{run.id}/scalars?key=loss&start_step=10&since_step=10&end_step=12")
    assert both["steps"] == [11, 12]


def test_downsampled_series_keeps_spike_and_marks_nonfinite(server: ServerProcess, tmp_path: Path) -> None:
    n = 20_000
    with _stream(server, tmp_path, "long") as run:
        for step in range(n):
            value = 1.0 + (step % 10) * 1e-3
            if step == 12_345:
                value = 500.0
            elif step == 777:
                value = math.nan
            elif step == 15_000:
                value = -math.inf
            run.log({"loss": value}, step=step)
    data = server.get(f"/api/v1/runs/{run.id}/scalars?key=loss&max_points=100")
    assert data["downsampled"] is True and data["total_points"] == n
    assert data["bucket_steps"] == 512  # the smallest power of two giving at most 50 buckets
    assert len(data["steps"]) <= 100
    by_step = dict(zip(data["steps"], data["values"], strict=True))
    assert by_step[12_345] == 500.0
    assert by_step[777] == "NaN" and math.isnan(float_from_json(by_step[777]))
    assert by_step[15_000] == "-Infinity"
    assert data["nonfinite"] == {"nan": 1, "posinf": 0, "neginf": 1}


def test_openapi_docs_are_served(server: ServerProcess) -> None:
    status, spec = api_status(server.url + "/openapi.json")
    assert status == 200
    for path in ("scalars", "histograms", "events", "keys"):
        assert f"/api/v1/runs/{{run_id}}/{path}" in spec["paths"]
    histograms = spec["paths"]["/api/v1/runs/{run_id}/histograms"]["get"]
    assert "newest" in histograms["description"]
    assert {p["name"] for p in histograms["parameters"]} >= {"key", "since_step", "end_step", "rank", "limit"}
