"""Tokens: created by the CLI, stored hashed, checked with scopes on REST and on the socket."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import trimtab
from tests.helpers import ServerProcess, api_status, free_port, recv_frame, run_cli, wait_until
from trimtab import protocol
from trimtab.server.db.engine import make_engine
from trimtab.server.db.tables import api_tokens


def _token(db_url: str, scopes: str) -> str:
    result = run_cli("token", "create", "--scopes", scopes, "--name", scopes, "--db", db_url)
    token = result.stdout.strip()
    assert token.startswith("tt_") and len(token) > 40
    return token


@pytest.fixture
def auth_server(migrated_db: str, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(migrated_db, tmp_path / "server.log", extra_args=[])
    proc.start()
    yield proc
    proc.stop()


def _socket_error(server: ServerProcess, token: str | None) -> tuple[str, int | None]:
    url = server.url.replace("http://", "ws://") + protocol.WS_PATH
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with connect(url, additional_headers=headers, compression=None, open_timeout=10) as ws:
        hello = protocol.hello_frame(
            uid="u", project="p", name=None, resume_from_seq=1, agent_version="", host="", pid=1
        )
        # the server checks the token before reading anything, and may have closed already
        with contextlib.suppress(ConnectionClosed):
            ws.send(protocol.encode(hello))
        frame = recv_frame(ws)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    return frame["code"], closed.value.rcvd.code if closed.value.rcvd else None


def test_tokens_are_stored_hashed(migrated_db: str) -> None:
    token = _token(migrated_db, "read")
    engine = make_engine(migrated_db)
    try:
        with engine.connect() as conn:
            stored = conn.execute(select(api_tokens.c.token_hash, api_tokens.c.scopes)).all()
    finally:
        engine.dispose()
    assert len(stored) == 1 and stored[0].scopes == "read"
    assert token not in stored[0].token_hash and len(stored[0].token_hash) == 64


def test_socket_needs_a_valid_token_with_ingest_scope(
    auth_server: ServerProcess, migrated_db: str, tmp_path: Path
) -> None:
    assert _socket_error(auth_server, None) == ("unauthorized", 4401)
    assert _socket_error(auth_server, "tt_wrong") == ("unauthorized", 4401)
    assert _socket_error(auth_server, _token(migrated_db, "read")) == ("forbidden", 4403)
    ingest = _token(migrated_db, "ingest")
    run = trimtab.init(server=auth_server.url, token=ingest, spool_dir=str(tmp_path), replay_orphans=False)
    run.log({"loss": 0.5}, step=1)
    assert run.finish(timeout=30) is True
    run_url = f"{auth_server.url}/api/v1/runs/{run.id}"
    assert api_status(run_url, ingest)[0] == 403  # the ingest token writes but cannot read
    assert api_status(run_url, _token(migrated_db, "read"))[1]["n_points"] == 1


def test_rest_scopes(auth_server: ServerProcess, migrated_db: str) -> None:
    url = auth_server.url + "/api/v1/runs"
    status, body = api_status(url)
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, body = api_status(url, _token(migrated_db, "ingest"))
    assert (status, body["error"]["code"]) == (403, "forbidden")
    assert "read" in body["error"]["message"]
    assert api_status(url, _token(migrated_db, "read"))[0] == 200
    assert api_status(url, _token(migrated_db, "admin"))[0] == 200
    assert api_status(auth_server.url + "/healthz")[0] == 200


def test_no_auth_is_refused_on_a_public_bind(migrated_db: str) -> None:
    result = run_cli(
        "server", "--host", "0.0.0.0", "--port", str(free_port()), "--db", migrated_db, "--no-auth", check=False
    )
    assert result.returncode != 0
    assert "--no-auth is allowed only on a loopback address" in result.stderr


def test_unknown_scope_is_refused(migrated_db: str) -> None:
    result = run_cli("token", "create", "--scopes", "read,root", "--db", migrated_db, check=False)
    assert result.returncode == 2 and "scopes must be" in result.stderr


def test_revoked_token_is_refused(auth_server: ServerProcess, migrated_db: str) -> None:
    token = _token(migrated_db, "read")
    url = auth_server.url + "/api/v1/runs"
    assert api_status(url, token)[0] == 200
    listing = run_cli("token", "list", "--db", migrated_db).stdout
    assert token not in listing and token[:10] in listing and "active" in listing
    token_id = listing.splitlines()[1].split()[0]
    run_cli("token", "revoke", token_id, "--db", migrated_db)
    assert "revoked" in run_cli("token", "list", "--db", migrated_db).stdout
    wait_until(lambda: api_status(url, token)[0] == 401, 30, "the revocation to pass the token cache")
    again = run_cli("token", "revoke", token_id, "--db", migrated_db, check=False)
    assert again.returncode == 2 and "no active token" in again.stderr
