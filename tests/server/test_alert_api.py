"""Rules and alerts over REST on a real server: CRUD, effective rules, bad input, scopes."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import trimtab
from tests.helpers import ServerProcess, run_cli, wait_until
from trimtab.detectors import DEFAULT_RULES

THRESHOLD = {"name": "logits", "key": "attn/max_logit", "detector": "threshold", "params": {"op": ">", "limit": 100.0}}


def call(server: ServerProcess, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _error(result: tuple[int, Any]) -> tuple[int, str]:
    status, body = result
    return status, body["error"]["code"]


def _run(server: ServerProcess, tmp_path: Path, name: str, project: str = "rules", **kw: Any) -> int:
    with trimtab.init(
        server=server.url, project=project, name=name, spool_dir=str(tmp_path / name), replay_orphans=False, **kw
    ) as run:
        run.log({"loss": 1.0}, step=0)
    run_id = run.id
    assert run_id is not None
    return run_id


def test_a_new_project_shows_the_shipped_defaults(server: ServerProcess) -> None:
    status, rules = call(server, "GET", "/api/v1/projects/fresh/rules")
    assert status == 200
    assert [r["name"] for r in rules] == sorted(spec.name for spec in DEFAULT_RULES)
    assert {r["source"] for r in rules} == {"default"}
    nonfinite = next(r for r in rules if r["name"] == "nonfinite-loss")
    assert nonfinite["key"] == "loss" and nonfinite["detector"] == "nonfinite" and nonfinite["remedy"]
    status, one = call(server, "GET", "/api/v1/projects/fresh/rules/nonfinite-loss")
    assert status == 200 and one == nonfinite


def test_project_rule_crud(server: ServerProcess) -> None:
    base = "/api/v1/projects/crud/rules"
    status, created = call(server, "POST", base, THRESHOLD)
    assert status == 201 and created["source"] == "project" and created["severity"] is None
    assert created["cooldown_s"] == 300.0 and created["remedy"]  # defaults filled in
    assert _error(call(server, "POST", base, THRESHOLD)) == (409, "rule_exists")
    status, replaced = call(server, "PUT", f"{base}/logits", {**THRESHOLD, "severity": "critical"})
    assert status == 200 and replaced["severity"] == "critical"
    assert call(server, "GET", f"{base}/logits")[1]["severity"] == "critical"
    # a body without a name takes the path's
    body = {k: v for k, v in THRESHOLD.items() if k != "name"}
    status, _ = call(server, "PUT", f"{base}/logits2", body)
    assert status == 200
    names = {r["name"]: r["source"] for r in call(server, "GET", base)[1]}
    assert names["logits"] == names["logits2"] == "project" and names["nonfinite-loss"] == "default"

    assert call(server, "DELETE", f"{base}/logits") == (204, None)
    assert _error(call(server, "GET", f"{base}/logits")) == (404, "rule_not_found")
    assert _error(call(server, "DELETE", f"{base}/logits")) == (404, "rule_not_found")
    status, body = call(server, "DELETE", f"{base}/nonfinite-loss")
    assert status == 404 and "enabled: false" in body["error"]["message"]


def test_overriding_and_switching_off_a_default(server: ServerProcess) -> None:
    base = "/api/v1/projects/over/rules"
    off = {"name": "nonfinite-loss", "key": "loss", "detector": "nonfinite", "enabled": False}
    assert call(server, "PUT", f"{base}/nonfinite-loss", off)[0] == 200
    rule = call(server, "GET", f"{base}/nonfinite-loss")[1]
    assert rule["source"] == "project" and rule["enabled"] is False
    assert call(server, "DELETE", f"{base}/nonfinite-loss")[0] == 204  # the default is back
    rule = call(server, "GET", f"{base}/nonfinite-loss")[1]
    assert rule["source"] == "default" and rule["enabled"] is True


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**THRESHOLD, "treshold": 5}, "treshold"),  # unknown field
        ({**THRESHOLD, "params": {"op": ">", "limit": "big"}}, "params"),  # invalid threshold
        ({**THRESHOLD, "params": {"op": ">"}}, "limit"),
        ({**THRESHOLD, "detector": "magic"}, "detector"),
        ({**THRESHOLD, "cooldown_s": -1}, "cooldown_s"),
        ({**THRESHOLD, "severity": "page-everyone"}, "severity"),
        ({**THRESHOLD, "key": ""}, "key"),
        ({**THRESHOLD, "name": "no spaces"}, "name"),
        ({**THRESHOLD, "confirm": {"key": "attn/max_logit", "detector": "nonfinite"}}, "confirm.key"),
        ({**THRESHOLD, "remedy": "lower the LR\x00"}, "remedy"),
        ({**THRESHOLD, "params": {"op": ">\x00", "limit": 1.0}}, "params.op"),
    ],
)
def test_invalid_rules_are_422_with_the_reason_and_change_nothing(
    server: ServerProcess, body: dict[str, Any], field: str
) -> None:
    status, answer = call(server, "POST", "/api/v1/projects/bad/rules", body)
    assert (status, answer["error"]["code"]) == (422, "invalid_rule")
    assert field in answer["error"]["message"]
    assert {r["source"] for r in call(server, "GET", "/api/v1/projects/bad/rules")[1]} == {"default"}


def test_malformed_rule_requests(server: ServerProcess) -> None:
    base = "/api/v1/projects/bad/rules"
    assert _error(call(server, "POST", base, [THRESHOLD])) == (422, "invalid_request")  # not an object
    assert _error(call(server, "PUT", f"{base}/other", THRESHOLD)) == (422, "invalid_rule")  # name differs
    assert _error(call(server, "GET", f"/api/v1/projects/{'p' * 129}/rules")) == (422, "invalid_request")
    assert _error(call(server, "GET", f"{base}/{'r' * 129}")) == (422, "invalid_request")
    assert _error(call(server, "GET", "/api/v1/projects/bad/rules/nope")) == (404, "rule_not_found")


def test_per_run_overrides(server: ServerProcess, tmp_path: Path) -> None:
    run_id = _run(server, tmp_path, "one")
    other = _run(server, tmp_path, "two")
    call(server, "POST", "/api/v1/projects/rules/rules", THRESHOLD)
    status, rule = call(server, "PUT", f"/api/v1/runs/{run_id}/rules/logits", {**THRESHOLD, "enabled": False})
    assert status == 200 and rule["source"] == "run"
    assert call(server, "GET", f"/api/v1/runs/{run_id}/rules/logits")[1]["enabled"] is False
    assert call(server, "GET", f"/api/v1/runs/{other}/rules/logits")[1]["source"] == "project"
    assert call(server, "GET", "/api/v1/projects/rules/rules/logits")[1]["enabled"] is True
    assert _error(call(server, "POST", f"/api/v1/runs/{run_id}/rules", THRESHOLD)) == (409, "rule_exists")
    assert call(server, "DELETE", f"/api/v1/runs/{run_id}/rules/logits") == (204, None)
    assert call(server, "GET", f"/api/v1/runs/{run_id}/rules/logits")[1]["source"] == "project"
    assert _error(call(server, "GET", "/api/v1/runs/999999/rules")) == (404, "run_not_found")
    assert _error(call(server, "PUT", "/api/v1/runs/999999/rules/logits", THRESHOLD)) == (404, "run_not_found")
    assert _error(call(server, "GET", "/api/v1/runs/0/rules")) == (422, "invalid_request")


def test_alerts_listing_filters_and_errors(server: ServerProcess, tmp_path: Path) -> None:
    with trimtab.init(
        server=server.url, project="listing", name="nan", spool_dir=str(tmp_path / "nan"), replay_orphans=False
    ) as run:
        run.log({"loss": 1.0, "grad_norm/total": 1.0}, step=0)
        run.log({"loss": math.nan, "grad_norm/total": math.inf}, step=1)
    run_id = run.id

    def both() -> bool:
        return len(call(server, "GET", f"/api/v1/runs/{run_id}/alerts")[1]) == 2

    wait_until(both, 30, "two alerts")
    newest, oldest = call(server, "GET", f"/api/v1/runs/{run_id}/alerts")[1]
    assert newest["id"] > oldest["id"]
    assert {newest["rule"], oldest["rule"]} == {"nonfinite-loss", "nonfinite-grad-norm"}
    assert call(server, "GET", "/api/v1/alerts?order=oldest&limit=1")[1][0]["id"] == oldest["id"]
    assert [a["id"] for a in call(server, "GET", f"/api/v1/alerts?after_id={oldest['id']}")[1]] == [newest["id"]]
    assert [a["id"] for a in call(server, "GET", f"/api/v1/alerts?before_id={newest['id']}")[1]] == [oldest["id"]]
    assert len(call(server, "GET", "/api/v1/alerts?project=listing&severity=critical")[1]) == 2
    assert call(server, "GET", "/api/v1/alerts?project=listing&severity=info")[1] == []  # a filter, not an error
    assert call(server, "GET", "/api/v1/alerts?project=elsewhere")[1] == []
    assert call(server, "GET", f"/api/v1/alerts/{newest['id']}")[1]["id"] == newest["id"]
    values = {a["rule"]: a["value"] for a in (newest, oldest)}
    assert values == {"nonfinite-loss": "NaN", "nonfinite-grad-norm": "Infinity"}
    assert newest["url"].endswith(f"/runs/{run_id}")

    for bad in ("status=open", "severity=notice", "limit=0", "limit=1001", "after_id=-1", "order=random"):
        assert _error(call(server, "GET", f"/api/v1/alerts?{bad}")) == (422, "invalid_request"), bad
    assert _error(call(server, "GET", "/api/v1/alerts/424242")) == (404, "alert_not_found")
    assert _error(call(server, "GET", "/api/v1/runs/424242/alerts")) == (404, "run_not_found")


@pytest.fixture
def auth_server(migrated_db: str, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(migrated_db, tmp_path / "auth.log", extra_args=[])
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def test_reading_rules_needs_read_and_writing_needs_admin(auth_server: ServerProcess, migrated_db: str) -> None:
    read = run_cli("token", "create", "--scopes", "read", "--db", migrated_db).stdout.strip()
    admin = run_cli("token", "create", "--scopes", "admin", "--db", migrated_db).stdout.strip()
    base = "/api/v1/projects/secure/rules"
    assert _error(call(auth_server, "GET", base)) == (401, "unauthorized")
    assert call(auth_server, "GET", base, token=read)[0] == 200
    assert call(auth_server, "GET", "/api/v1/alerts", token=read)[0] == 200
    assert _error(call(auth_server, "POST", base, THRESHOLD, token=read)) == (403, "forbidden")
    assert _error(call(auth_server, "DELETE", f"{base}/logits", token=read)) == (403, "forbidden")
    assert call(auth_server, "POST", base, THRESHOLD, token=admin)[0] == 201
