"""``/api/v1/sinks`` on a real server: create, list, read, delete, test; bad input; scopes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, text

from tests.helpers import ServerProcess, free_port, run_cli
from tests.server.receiver import receiver
from trimtab import webhooks
from trimtab.server.alerts.sinks import NAME_LIMIT
from trimtab.server.db.engine import make_engine
from trimtab.server.db.tables import sinks

SINKS = "/api/v1/sinks"


def call(server: ServerProcess, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or None) without raising on 4xx/5xx."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_webhook_sink_gets_a_generated_secret_shown_once(server: ServerProcess) -> None:
    status, created = call(server, "POST", SINKS, {"kind": "webhook", "url": "https://example.com/hooks?key=abc"})
    assert status == 201
    assert created["secret"].startswith("whsec_") and len(created["secret"]) > 40
    assert created["has_secret"] is True and created["project"] is None and created["enabled"] is True
    assert created["name"] == "webhook example.com"
    assert created["url"] == "https://example.com/***"
    assert created["deliveries"] == {"pending": 0, "delivered": 0, "dead": 0}
    listed = call(server, "GET", SINKS)[1]
    one = call(server, "GET", f"{SINKS}/{created['id']}")[1]
    for shown in (listed[0], one):
        assert "secret" not in shown and created["secret"] not in json.dumps(shown)
        assert shown["url"] == "https://example.com/***"


def test_a_webhook_url_shows_only_its_scheme_host_and_port(server: ServerProcess) -> None:
    url = "https://bot:pw@hooks.example.com:8443/t/TOKENPATH?sig=abc"
    created = call(server, "POST", SINKS, {"kind": "webhook", "url": url})[1]
    bare = call(server, "POST", SINKS, {"kind": "webhook", "url": "http://127.0.0.1:9"})[1]
    shown = [created, call(server, "GET", SINKS)[1], call(server, "GET", f"{SINKS}/{created['id']}")[1]]
    # (not a bare "pw": the generated secret in the create answer may hold those two letters)
    assert (
        "TOKENPATH" not in json.dumps(shown) and "bot:pw" not in json.dumps(shown) and ":pw@" not in json.dumps(shown)
    )
    assert created["url"] == "https://***@hooks.example.com:8443/***"
    assert bare["url"] == "http://127.0.0.1:9"


def test_the_default_name_of_a_sink_with_a_long_host_fits(server: ServerProcess) -> None:
    assert sinks.c.name.type.length == NAME_LIMIT  # type: ignore[attr-defined]
    host = ".".join(["a" * 60] * 4) + ".example.com"
    status, created = call(server, "POST", SINKS, {"kind": "webhook", "url": f"https://{host}/hook"})
    assert status == 201, created
    assert created["name"] == f"webhook {host}"[:NAME_LIMIT]


def test_slack_url_path_is_never_shown(server: ServerProcess) -> None:
    url = "https://hooks.slack.com/services/T000/B000/XXXXXXXXXXXXXXXX"
    status, created = call(server, "POST", SINKS, {"kind": "slack", "url": url, "project": "llm", "name": "#training"})
    assert status == 201 and created["secret"] is None and created["has_secret"] is False
    assert created["project"] == "llm" and created["name"] == "#training"
    shown = [created, call(server, "GET", SINKS)[1], call(server, "GET", f"{SINKS}/{created['id']}")[1]]
    everything = json.dumps(shown)
    assert "XXXXXXXX" not in everything and "T000" not in everything
    assert created["url"] == "https://hooks.slack.com/***"


def test_given_secret_is_kept_and_not_echoed(server: ServerProcess) -> None:
    secret = "my-own-secret-0123456789"
    status, created = call(server, "POST", SINKS, {"kind": "webhook", "url": "http://127.0.0.1:9/x", "secret": secret})
    assert status == 201 and created["secret"] is None and created["has_secret"] is True
    assert secret not in json.dumps(call(server, "GET", SINKS)[1])


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"kind": "webhook", "url": "ftp://example.com/x"}, "http:// or https://"),
        ({"kind": "webhook", "url": "javascript:alert(1)"}, "http:// or https://"),
        ({"kind": "webhook", "url": "http://"}, "no host"),
        ({"kind": "webhook", "url": "https:///path"}, "no host"),
        ({"kind": "webhook", "url": "example.com/hook"}, "http:// or https://"),
        ({"kind": "webhook", "url": "http://exa mple.com/"}, "whitespace"),
        ({"kind": "webhook", "url": "http://example.com:99999/"}, "not a valid URL"),
        ({"kind": "webhook", "url": "http://example.com:0/"}, "1-65535"),
        ({"kind": "webhook", "url": "http://\u00ad.com/"}, "not a valid URL"),
        ({"kind": "webhook", "url": ""}, "url"),
        ({"kind": "webhook", "url": "https://example.com/" + "a" * 2100}, "url"),
        ({"kind": "webhook"}, "url"),
        ({"kind": "email", "url": "https://example.com/"}, "kind"),
        ({"kind": "webhook", "url": "https://example.com/", "secret": "short"}, "secret"),
        ({"kind": "slack", "url": "https://hooks.slack.com/services/x", "secret": "0123456789abcdefgh"}, "no secret"),
        ({"kind": "webhook", "url": "https://example.com/", "colour": "red"}, "colour"),
        ({"kind": "webhook", "url": "https://example.com/", "project": ""}, "project"),
        ({"kind": "webhook", "url": "https://example.com/", "project": "a\x00b"}, "project"),
        ({"kind": "webhook", "url": "https://example.com/", "enabled": "maybe"}, "enabled"),
        ({"kind": "webhook", "url": "https://example.com/", "name": "n" * 129}, "name"),
        ([1, 2], "body"),
    ],
)
def test_bad_sinks_get_422_with_the_reason(server: ServerProcess, body: Any, reason: str) -> None:
    status, answer = call(server, "POST", SINKS, body)
    assert status == 422, answer
    assert answer["error"]["code"] == "invalid_request"
    assert reason in answer["error"]["message"], answer
    assert call(server, "GET", SINKS)[1] == []


def test_broken_json_body_gets_422(server: ServerProcess) -> None:
    status, answer = call(server, "POST", SINKS, b"{not json")
    assert status == 422 and answer["error"]["code"] == "invalid_request"


def test_delete_and_unknown_ids(server: ServerProcess) -> None:
    sink = call(server, "POST", SINKS, {"kind": "webhook", "url": "http://127.0.0.1:9/x"})[1]
    assert call(server, "DELETE", f"{SINKS}/{sink['id']}") == (204, None)
    for method in ("GET", "DELETE"):
        status, answer = call(server, method, f"{SINKS}/{sink['id']}")
        assert status == 404 and answer["error"]["code"] == "not_found"
    status, answer = call(server, "POST", f"{SINKS}/0/test")
    assert status == 422 and answer["error"]["code"] == "invalid_request"
    assert call(server, "GET", f"{SINKS}/99999999999999999999")[0] == 422


def test_test_endpoint_sends_a_signed_message_now(server: ServerProcess) -> None:
    with receiver() as hook:
        sink = call(server, "POST", SINKS, {"kind": "webhook", "url": hook.url})[1]
        assert call(server, "POST", f"{SINKS}/{sink['id']}/test") == (
            200,
            {"delivered": True, "status": 200, "error": None},
        )
        [got] = hook.all()
    headers = got.headers
    assert webhooks.verify(sink["secret"], headers["x-trimtab-timestamp"], headers["x-trimtab-signature"], got.body)
    assert headers["x-trimtab-delivery"].startswith("test-")
    body = got.json()
    assert body["event"] == "test" and body["delivery_id"] is None and body["alert"]["rule"] == "test"


def test_test_endpoint_reports_what_the_receiver_did(server: ServerProcess) -> None:
    with receiver(lambda n: 500) as failing, receiver() as slack:
        bad = call(server, "POST", SINKS, {"kind": "webhook", "url": failing.url})[1]
        status, answer = call(server, "POST", f"{SINKS}/{bad['id']}/test")
        assert status == 200 and answer["delivered"] is False and answer["status"] == 500
        assert answer["error"] == "HTTP 500: receiver says no"
        nobody = call(server, "POST", SINKS, {"kind": "webhook", "url": f"http://127.0.0.1:{free_port()}/"})[1]
        answer = call(server, "POST", f"{SINKS}/{nobody['id']}/test")[1]
        assert answer["delivered"] is False and answer["status"] is None and "cannot connect" in answer["error"]
        chat = call(server, "POST", SINKS, {"kind": "slack", "url": slack.url})[1]
        assert call(server, "POST", f"{SINKS}/{chat['id']}/test")[1]["delivered"] is True
        message = slack.all()[0].json()
        assert "trimtab test message" in message["text"] and message["blocks"]
    # A test message is not queued, so the sinks' counts stay empty.
    assert all(s["deliveries"] == {"pending": 0, "delivered": 0, "dead": 0} for s in call(server, "GET", SINKS)[1])


@pytest.fixture
def impatient_server(migrated_db: str, tmp_path: Path) -> Iterator[ServerProcess]:
    """A server whose statements give up after 0.5 s waiting for a lock."""
    proc = ServerProcess(migrated_db, tmp_path / "server.log")
    proc.env = {"TRIMTAB_LOCK_TIMEOUT_S": "0.5"}
    proc.start()
    yield proc
    proc.stop()


def test_a_database_error_while_adding_a_sink_does_not_log_its_secret(
    impatient_server: ServerProcess, migrated_db: str
) -> None:
    secret, path = "whsec_never-in-a-log-0123456789", "private-path-0123"
    locker = make_engine(migrated_db)
    try:
        with locker.connect() as conn:  # hold the sinks table: PostgreSQL's table lock, SQLite's write lock
            if locker.dialect.name == "postgresql":
                conn.execute(text("LOCK TABLE sinks IN EXCLUSIVE MODE"))
            else:
                conn.execute(delete(sinks))
            body = {"kind": "webhook", "url": f"https://hooks.example.com/{path}", "secret": secret}
            status, answer = call(impatient_server, "POST", SINKS, body)
            conn.rollback()
    finally:
        locker.dispose()
    assert (status, answer["error"]["code"]) == (503, "store_unavailable")
    log = impatient_server.log()
    assert "database error" in log and "INSERT INTO sinks" in log
    assert secret not in log and path not in log


@pytest.fixture
def auth_server(migrated_db: str, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(migrated_db, tmp_path / "server.log", extra_args=[])
    proc.start()
    yield proc
    proc.stop()


def test_reads_need_read_and_writes_need_admin(auth_server: ServerProcess, migrated_db: str) -> None:
    def token(scopes: str) -> str:
        return run_cli("token", "create", "--scopes", scopes, "--name", scopes, "--db", migrated_db).stdout.strip()

    read, admin = token("read"), token("admin")
    body = {"kind": "webhook", "url": "http://127.0.0.1:9/x"}
    assert call(auth_server, "POST", SINKS, body)[0] == 401
    status, answer = call(auth_server, "POST", SINKS, body, token=read)
    assert (status, answer["error"]["code"]) == (403, "forbidden")
    status, sink = call(auth_server, "POST", SINKS, body, token=admin)
    assert status == 201
    assert call(auth_server, "GET", SINKS, token=read)[0] == 200
    assert call(auth_server, "GET", SINKS)[0] == 401
    assert call(auth_server, "POST", f"{SINKS}/{sink['id']}/test", token=read)[0] == 403
    assert call(auth_server, "DELETE", f"{SINKS}/{sink['id']}", token=read)[0] == 403
    assert call(auth_server, "DELETE", f"{SINKS}/{sink['id']}", token=admin)[0] == 204
