"""Dashboard login and sessions over real HTTP: a real server with auth on, tokens of each
scope, the signed HTTP-only cookie; and the dashboard served on its own against that API."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.browser.chrome import wait_for
from tests.helpers import ROOT, ServerProcess, free_port, run_cli, subprocess_env


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("session")
    db = f"sqlite:///{tmp / 'trimtab.db'}"
    run_cli("db", "upgrade", "--db", db)
    tokens = {
        s: run_cli("token", "create", "--scopes", s, "--name", f"{s}-token", "--db", db).stdout.strip()
        for s in ("ingest", "read", "read,control")
    }
    server = ServerProcess(db, tmp / "server.log", extra_args=[])
    server.start()
    try:
        yield server, tokens
    finally:
        server.stop()


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, follow_redirects=False, timeout=30)


def test_pages_need_a_session_and_callbacks_get_a_json_401(secured: tuple[ServerProcess, dict[str, str]]) -> None:
    server, _ = secured
    with client(server.url) as http:
        page = http.get("/runs/3/layers?x=1")
        assert page.status_code == 302 and page.headers["location"] == "/login?next=/runs/3/layers?x=1"
        callback = http.post("/_dash-update-component", json={})
        assert callback.status_code == 401 and callback.json()["error"]["code"] == "unauthorized"
        assert http.get("/login").status_code == 200
        assert http.get("/loginX").status_code == 302  # open paths match exactly
        # The API keeps its own errors: never the dashboard's HTML.
        missing = http.get("/api/v1/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        wrong_method = http.delete("/api/v1/runs")
        assert wrong_method.status_code == 404 and "DELETE /api/v1/runs" in wrong_method.json()["error"]["message"]


@pytest.mark.parametrize(
    ("token", "status", "message"),
    [
        ("", 400, "Paste an API token"),
        ("tt_unknown", 401, "unknown or revoked"),
        ("ingest", 403, "lacks the &#x27;read&#x27; scope"),
    ],
)
def test_a_bad_login_says_why(
    secured: tuple[ServerProcess, dict[str, str]], token: str, status: int, message: str
) -> None:
    server, tokens = secured
    with client(server.url) as http:
        resp = http.post("/login", data={"token": tokens.get(token, token), "next": "/"})
        assert resp.status_code == status and message in resp.text
        assert "trimtab_session" not in resp.cookies


def test_login_sets_a_signed_http_only_cookie_and_logout_ends_it(
    secured: tuple[ServerProcess, dict[str, str]],
) -> None:
    server, tokens = secured
    with client(server.url) as http:
        resp = http.post("/login", data={"token": tokens["read"], "next": "/runs/1"})
        assert resp.status_code == 302 and resp.headers["location"] == "/runs/1"
        cookie = resp.headers["set-cookie"]
        assert "trimtab_session=" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert http.get("/").status_code == 200
        layout = http.get("/_dash-layout")
        assert layout.status_code == 200 and "read-token" in layout.text  # the nav shows who is logged in

        value = http.cookies["trimtab_session"]
        payload, _, signature = value.rpartition(".")
        forged = f"{payload}.{'A' * len(signature)}"
        tampered = httpx.get(server.url + "/", headers={"cookie": f"trimtab_session={forged}"}, timeout=30)
        assert tampered.status_code == 302  # a cookie whose signature fails is no session

        assert http.get("/logout").headers["location"] == "/login"
        assert http.get("/").status_code == 302


@pytest.mark.parametrize(
    "target", ["//evil.example/x", "https://evil.example/", "javascript:alert(1)", "runs/1", "/\\evil.example"]
)
def test_login_never_redirects_off_site(secured: tuple[ServerProcess, dict[str, str]], target: str) -> None:
    server, tokens = secured
    with client(server.url) as http:
        resp = http.post("/login", data={"token": tokens["read"], "next": target})
        assert resp.status_code == 302 and resp.headers["location"] == "/"


def start_dashboard(api_url: str, *extra: str, port: int | None = None) -> tuple[subprocess.Popen[str], int]:
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trimtab.cli", "dashboard", "--api-url", api_url, "--port", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
        cwd=ROOT,
    )
    return proc, port


def _answers(url: str, proc: subprocess.Popen[str]) -> bool:
    assert proc.poll() is None, proc.communicate()[0]
    try:
        return httpx.get(url, timeout=2).status_code in (200, 302)
    except httpx.HTTPError:
        return False


def test_the_dashboard_runs_on_its_own_against_a_remote_api(secured: tuple[ServerProcess, dict[str, str]]) -> None:
    server, tokens = secured
    proc, port = start_dashboard(server.url)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("the dashboard", lambda: _answers(url + "/login", proc), timeout=60)
        with client(url) as http:
            assert http.get("/").headers["location"] == "/login?next=/"  # it found the API wants tokens
            assert http.post("/login", data={"token": tokens["read,control"]}).status_code == 302
            body = {
                "output": "runs-table.children",
                "outputs": {"id": "runs-table", "property": "children"},
                "inputs": [{"id": "runs-tick", "property": "n_intervals", "value": 1}],
                "changedPropIds": ["runs-tick.n_intervals"],
                "state": [],
            }
            table = http.post("/_dash-update-component", json=body)
            assert table.status_code == 200 and "No runs yet" in table.text  # read through the remote API
    finally:
        proc.terminate()
        proc.wait(15)


def test_the_dashboard_refuses_an_unreachable_api_or_an_open_one_on_a_public_bind(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proc, _ = start_dashboard(dead)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0 and "did not answer" in out

    open_server = ServerProcess(f"sqlite:///{tmp_path / 'open.db'}", tmp_path / "open.log")
    run_cli("db", "upgrade", "--db", open_server.db_url)
    open_server.start()
    try:
        proc, _ = start_dashboard(open_server.url, "--host", "0.0.0.0")
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 2 and "runs without auth" in out
    finally:
        open_server.stop()
