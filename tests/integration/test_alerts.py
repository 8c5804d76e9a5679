"""Alerts end to end: a real agent streaming to a real server (SQLite and PostgreSQL)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import trimtab
from tests.helpers import ServerProcess, wait_until
from tests.server.test_alert_engine import comparable, training_series


def _init(server: ServerProcess, tmp_path: Path, name: str, project: str) -> trimtab.Run:
    return trimtab.init(
        server=server.url, project=project, name=name, spool_dir=str(tmp_path / name), replay_orphans=False
    )


def _alerts(server: ServerProcess, run_id: int) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = server.get(f"/api/v1/runs/{run_id}/alerts?order=oldest&limit=1000")
    return alerts


def test_a_nan_loss_alerts_with_no_configuration_at_all(server: ServerProcess, tmp_path: Path) -> None:
    run = _init(server, tmp_path, "nan-run", "fresh-project")
    for step in range(5):
        run.log({"loss": 2.0 - step * 0.1}, step=step)
    run.log({"loss": math.nan}, step=5)

    def firing() -> list[dict[str, Any]]:
        return [a for a in server.get("/api/v1/alerts?status=firing") if a["run_id"] == run.id]

    wait_until(lambda: bool(firing()), 30, "the alert")
    (alert,) = firing()
    assert alert["rule"] == "nonfinite-loss" and alert["severity"] == "critical" and alert["key"] == "loss"
    assert alert["value"] == "NaN" and alert["first_step"] == 5 and alert["project"] == "fresh-project"
    assert alert["run_name"] == "nan-run" and alert["remedy"] and alert["url"] == f"{server.url}/runs/{run.id}"
    assert run.finish(timeout=30) is True
    run_id = alert["run_id"]
    wait_until(lambda: _alerts(server, run_id)[0]["status"] == "resolved", 30, "the run's end to resolve it")
    assert _alerts(server, run_id)[0]["resolve_reason"] == "run_finished"


def _points(server: ServerProcess, name: str) -> int:
    return sum(r["n_points"] for r in server.get("/api/v1/runs?project=restart") if r["name"] == name)


def _ended(alerts: list[dict[str, Any]]) -> bool:
    return any(a["resolve_reason"] == "run_finished" for a in alerts)


def _stream(server: ServerProcess, tmp_path: Path, name: str, kill_at: int | None = None) -> int:
    series = training_series(3)
    keys = list(series)
    n = len(series[keys[0]])
    run = _init(server, tmp_path, name, "restart")
    for step in range(n):
        run.log({k: series[k][step][1] for k in keys}, step=step)
        if step == kill_at:
            stored = (step + 1) * len(keys)
            wait_until(lambda: _points(server, name) == stored, 60, "the first part")  # noqa: B023
            server.kill()  # SIGKILL: detector state not saved since the last periodic save
            server.start()
    assert run.finish(timeout=60) is True
    assert run.id is not None
    return run.id


def test_findings_are_the_same_when_the_server_is_killed_mid_run(server: ServerProcess, tmp_path: Path) -> None:
    reference = _stream(server, tmp_path, "reference")
    # The last step's NaN alert is resolved by the run's end, the engine's last item for the run
    wait_until(lambda: _ended(_alerts(server, reference)), 60, "the reference run's alerts")
    expected = comparable(_alerts(server, reference))
    assert {a[1] for a in expected} >= {"loss-spike", "loss-gross", "nonfinite-loss", "attention-logits"}

    restarted = _stream(server, tmp_path, "restarted", kill_at=450)
    got: list[Any] = []

    def same() -> bool:
        alerts = _alerts(server, restarted)
        got[:] = comparable(alerts)
        return _ended(alerts) and got == expected

    try:
        wait_until(same, 60, "the restarted run's alerts to match")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nexpected {expected}\ngot      {got}") from None
