"""README's quick start as a first-time user follows it on one machine: `trimtab server` (auth
on, its default embedded database), the attach snippet with no token, and the dashboard link
the server prints. Real server subprocess, real agent, real HTTP with cookies."""

from __future__ import annotations

import http.cookiejar
import logging
import stat
import urllib.request
from pathlib import Path

import pytest

import trimtab
from tests.dashboard.test_session import _answers, start_dashboard
from tests.helpers import ServerProcess, api_get, free_port, wait_until


def started(data: Path, tmp_path: Path, port: int) -> ServerProcess:
    server = ServerProcess("", tmp_path / "server.log", port=port, extra_args=[])  # auth on, embedded database
    server.env = {"TRIMTAB_DATA_DIR": str(data)}
    server.start()
    return server


def test_the_quick_start_works_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, port = tmp_path / "data", free_port()
    monkeypatch.setenv("TRIMTAB_DATA_DIR", str(data))  # as the user's own ~/.local/share/trimtab
    server = started(data, tmp_path, port)
    try:
        path = data / "local-token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the owner's only
        token = path.read_text().strip()
        wait_until(lambda: "/login?token=" in server.log(), 10, "the printed dashboard link")
        assert f"{server.url}/login?token={token}" in server.log() and str(path) in server.log()

        # README's attach snippet, as written: no token argument, no environment variable
        run = trimtab.init(server=server.url, project="quick", spool_dir=str(tmp_path / "spool"), replay_orphans=False)
        run.log({"loss": 1.0}, step=0)
        assert run.finish(timeout=30)
        listed = api_get(f"{server.url}/api/v1/runs?project=quick", token)
        assert [r["id"] for r in listed] == [run.id] and listed[0]["status"] == "finished"

        # the printed link logs the browser in, then the token leaves the address bar
        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with browser.open(f"{server.url}/login?token={token}&next=/runs/{run.id}", timeout=30) as resp:
            assert resp.status == 200 and resp.url == f"{server.url}/runs/{run.id}"
        with browser.open(f"{server.url}/", timeout=30) as resp:
            assert resp.url == f"{server.url}/" and b"API token" not in resp.read()  # not the login page

        # restarted, the server keeps the token; a token that stopped working is replaced
        server.stop()
        server = started(data, tmp_path, port)
        assert path.read_text().strip() == token
        server.stop()
        path.write_text("tt_revoked_or_from_another_database\n")
        server = started(data, tmp_path, port)
        fresh = path.read_text().strip()
        assert fresh != token and api_get(f"{server.url}/api/v1/runs", fresh) is not None
    finally:
        server.stop()


def test_a_refused_agent_is_told_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = ServerProcess(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "server.log", extra_args=[])
    server.env = {"TRIMTAB_AUTO_UPGRADE": "true"}
    server.start()
    try:
        caplog.set_level(logging.WARNING, logger="trimtab")
        run = trimtab.init(server=server.url, spool_dir=str(tmp_path / "spool"), replay_orphans=False)
        try:
            wait_until(lambda: "refused the connection" in caplog.text, 30, "the refusal")
        finally:
            run.finish(timeout=0.5)
        assert "unauthorized" in caplog.text and "Fix: pass token= to trimtab.init or set TRIMTAB_TOKEN" in caplog.text
        assert "trimtab token create --scopes ingest" in caplog.text
    finally:
        server.stop()


def test_a_dashboard_of_its_own_offers_the_local_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`trimtab dashboard --api-url` against the server on this machine prints a login link
    with the server's local token (as the server does); with a token the API refuses, none."""
    data = tmp_path / "data"
    monkeypatch.setenv("TRIMTAB_DATA_DIR", str(data))  # the dashboard subprocess inherits it
    server = started(data, tmp_path, free_port())
    try:
        token = (data / "local-token").read_text().strip()
        proc, port = start_dashboard(server.url)
        try:
            lines = [proc.stdout.readline() for _ in range(2)] if proc.stdout else []
            link = f"http://127.0.0.1:{port}/login?token={token}"
            assert any(link in line for line in lines), lines
            wait_until(lambda: _answers(f"http://127.0.0.1:{port}/login", proc), 60, "the dashboard")
            jar = http.cookiejar.CookieJar()
            browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
            with browser.open(link + "&next=/", timeout=30) as resp:
                assert resp.status == 200 and b"API token" not in resp.read()  # logged in, not the form
        finally:
            proc.terminate()
            proc.wait(15)

        (data / "local-token").write_text("tt_not_a_token_of_this_server\n")
        proc, port = start_dashboard(server.url)
        try:
            first = proc.stdout.readline() if proc.stdout else ""
            assert "login on" in first, first
            wait_until(lambda: _answers(f"http://127.0.0.1:{port}/login", proc), 60, "the dashboard")
        finally:
            proc.terminate()
            out = proc.communicate(timeout=15)[0]
        assert "login?token=" not in first + out
    finally:
        server.stop()
