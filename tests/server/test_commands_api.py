"""Commands over REST on a real server: create, idempotency by id, validation of every kind,
unknown and finished runs, the control scope, and the audit listing."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.helpers import ServerProcess, recv_frame
from tests.server.wire import WireAgent
from trimtab import protocol
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store
from trimtab.server.tokens import create_token


def call(server: ServerProcess, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    """(status, parsed JSON) of a REST call; ``body`` may be raw bytes to send as they are."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def post(server: ServerProcess, run_id: int, body: Any, token: str | None = None) -> tuple[int, Any]:
    return call(server, "POST", f"/api/v1/runs/{run_id}/commands", body, token)


def error(result: tuple[int, Any]) -> tuple[int, str]:
    status, body = result
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return status, body["error"]["code"]


def live_run(server: ServerProcess, uid: str) -> int:
    """A run that exists and is not finished (its agent connected once and went away)."""
    with WireAgent(server, uid) as agent:
        return agent.run_id


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_a_command_is_stored_pending_and_read_back(server: ServerProcess) -> None:
    run_id = live_run(server, "api")
    status, command = post(server, run_id, {"kind": "reduce_lr", "args": {"factor": 0.5, "min_lr": 1e-6}})
    assert status == 201
    assert len(command["id"]) == 32 and int(command["id"], 16) >= 0  # a uuid4 hex
    assert {k: command[k] for k in ("run_id", "kind", "args", "status", "source", "created_by")} == {
        "run_id": run_id,
        "kind": "reduce_lr",
        "args": {"factor": 0.5, "min_lr": 1e-6},
        "status": "pending",
        "source": "human",
        "created_by": "anonymous (auth disabled)",
    }
    assert (command["delivered_at"], command["finished_at"], command["step"], command["detail"]) == (
        None,
        None,
        None,
        None,
    )
    assert command["ranks"] == {}
    assert math.isclose(seconds(command["expires_at"]) - seconds(command["created_at"]), 3600, abs_tol=1e-3)
    assert call(server, "GET", f"/api/v1/runs/{run_id}/commands/{command['id']}") == (200, command)
    assert call(server, "GET", f"/api/v1/runs/{run_id}/commands") == (200, [command])

    status, custom = post(server, run_id, {"kind": "dump.activations", "args": {"layers": [1, 2]}, "expires_in_s": 60})
    assert status == 201 and custom["kind"] == "dump.activations" and custom["args"] == {"layers": [1, 2]}
    assert math.isclose(seconds(custom["expires_at"]) - seconds(custom["created_at"]), 60, abs_tol=1e-3)
    status, bare = post(server, run_id, {"kind": "checkpoint"})  # args may be left out
    assert status == 201 and bare["args"] == {}


def test_the_same_id_is_idempotent_and_a_different_command_under_it_conflicts(server: ServerProcess) -> None:
    run_id, other_run = live_run(server, "idem"), live_run(server, "idem-2")
    body = {"id": "retry-1", "kind": "skip_batches", "args": {"n": 3}}
    status, first = post(server, run_id, body)
    assert status == 201 and first["id"] == "retry-1"
    assert post(server, run_id, body) == (200, first)  # a retry: the stored command, not a second one
    assert post(server, run_id, {**body, "expires_in_s": 10}) == (200, first)  # the expiry is not part of it
    assert error(post(server, run_id, {**body, "args": {"n": 4}})) == (409, "command_conflict")
    assert error(post(server, run_id, {**body, "kind": "pause", "args": {}})) == (409, "command_conflict")
    assert error(post(server, other_run, body)) == (409, "command_conflict")  # ids are unique across runs
    assert call(server, "GET", f"/api/v1/runs/{run_id}/commands")[1] == [first]
    assert call(server, "GET", f"/api/v1/runs/{other_run}/commands")[1] == []
    assert error(call(server, "GET", f"/api/v1/runs/{other_run}/commands/retry-1")) == (404, "command_not_found")


BAD: list[tuple[Any, str]] = [
    # (body, a part of the message)
    ([1, 2], "JSON object"),
    ({"args": {}}, "'kind' is required"),
    ({"kind": 5}, "'kind' is required"),
    ({"kind": "pause", "args": [1]}, "'args' must be a JSON object"),
    ({"kind": "pause", "colour": "red"}, "unknown field(s) 'colour'"),
    ({"kind": "pause", "id": ""}, "'id' must be 1-64"),
    ({"kind": "pause", "id": "x" * 65}, "'id' must be 1-64"),
    ({"kind": "pause", "id": "a b"}, "'id' must be 1-64"),
    ({"kind": "pause", "id": 7}, "'id' must be 1-64"),
    ({"kind": "pause", "expires_in_s": 0}, "'expires_in_s'"),
    ({"kind": "pause", "expires_in_s": 7 * 86400 + 1}, "'expires_in_s'"),
    ({"kind": "pause", "expires_in_s": "60"}, "'expires_in_s'"),
    ({"kind": "pause", "expires_in_s": True}, "'expires_in_s'"),
    ({"kind": "reduce_lr", "args": {}}, "missing argument(s) 'factor'"),
    ({"kind": "reduce_lr", "args": {"factor": 1}}, "0 < factor < 1"),
    ({"kind": "reduce_lr", "args": {"factor": 0}}, "0 < factor < 1"),
    ({"kind": "reduce_lr", "args": {"factor": 1.5}}, "0 < factor < 1"),
    ({"kind": "reduce_lr", "args": {"factor": "0.5"}}, "0 < factor < 1"),
    ({"kind": "reduce_lr", "args": {"factor": True}}, "0 < factor < 1"),
    ({"kind": "reduce_lr", "args": {"factor": 0.5, "min_lr": -1}}, "'min_lr'"),
    ({"kind": "reduce_lr", "args": {"factor": 0.5, "min_lr": None}}, "'min_lr'"),
    ({"kind": "reduce_lr", "args": {"factor": 0.5, "floor": 0}}, "unknown argument(s) 'floor'"),
    ({"kind": "set_lr", "args": {}}, "missing argument(s) 'lr'"),
    ({"kind": "set_lr", "args": {"lr": 0}}, "'lr' must be a finite number > 0"),
    ({"kind": "set_lr", "args": {"lr": -0.1}}, "'lr' must be a finite number > 0"),
    ({"kind": "set_lr", "args": {"lr": 1e400}}, "'lr' must be a finite number > 0"),  # JSON's 1e400 is inf
    ({"kind": "set_hparams", "args": {}}, "at least one"),
    ({"kind": "set_hparams", "args": {"lr": 0.1}}, "use set_lr"),
    ({"kind": "set_hparams", "args": {"initial_lr": 0.1}}, "use set_lr"),
    ({"kind": "set_hparams", "args": {"weight_decay": "high"}}, "'weight_decay' must be a finite number"),
    ({"kind": "set_hparams", "args": {"betas": []}}, "'betas' must be a finite number or a list"),
    ({"kind": "set_hparams", "args": {"betas": [0.9, "x"]}}, "'betas' must be a finite number or a list"),
    ({"kind": "set_hparams", "args": {"momentum": None}}, "'momentum' must be a finite number"),
    ({"kind": "set_hparams", "args": {"bad key": 1}}, "not a param-group field name"),
    ({"kind": "skip_batches", "args": {}}, "missing argument(s) 'n'"),
    ({"kind": "skip_batches", "args": {"n": 0}}, "'n' must be an integer from 1 to 100000"),
    ({"kind": "skip_batches", "args": {"n": 100001}}, "'n' must be an integer from 1 to 100000"),
    ({"kind": "skip_batches", "args": {"n": 2.0}}, "'n' must be an integer"),
    ({"kind": "skip_batches", "args": {"n": 2, "m": 1}}, "unknown argument(s) 'm'"),
    ({"kind": "rollback", "args": {"to_step": -1}}, "'to_step' must be an integer >= 0"),
    ({"kind": "rollback", "args": {"to_step": 1.5}}, "'to_step' must be an integer >= 0"),
    ({"kind": "rollback", "args": {"step": 3}}, "unknown argument(s) 'step'"),
    ({"kind": "checkpoint", "args": {"path": "/tmp"}}, "checkpoint: unknown argument(s) 'path'"),
    ({"kind": "pause", "args": {"for_s": 3}}, "pause: unknown argument(s) 'for_s'"),
    ({"kind": "resume", "args": {"x": 1}}, "resume: unknown argument(s) 'x'"),
    ({"kind": "stop", "args": {"now": True}}, "stop: unknown argument(s) 'now'"),
    ({"kind": "Reduce_LR"}, "unknown command kind 'Reduce_LR'"),
    ({"kind": ""}, "unknown command kind ''"),
    ({"kind": "9lives"}, "unknown command kind"),
    ({"kind": "a" * 65}, "unknown command kind"),
    ({"kind": "my kind"}, "unknown command kind"),
    ({"kind": "mine", "args": {"blob": "x" * 17000}}, "at most 16384"),
    ({"kind": "mine", "args": {"v": 2**64}}, "integer out of the 64-bit range"),
    ({"kind": "mine", "args": {"v": "a\x00b"}}, "NUL"),
]


def test_every_bad_command_is_refused_with_its_reason_and_nothing_is_stored(server: ServerProcess) -> None:
    run_id = live_run(server, "bad")
    wrong = []
    for body, reason in BAD:
        status, answer = post(server, run_id, body)
        got = (status, answer.get("error", {}).get("code"))
        if got != (422, "invalid_command") or reason not in answer["error"]["message"]:
            wrong.append((body, status, answer))
    assert not wrong, wrong
    # NaN is not JSON, but Python's parser takes it: a non-finite number is still refused
    for raw in (b'{"kind": "set_lr", "args": {"lr": NaN}}', b'{"kind": "mine", "args": {"x": Infinity}}'):
        assert error(post(server, run_id, raw)) == (422, "invalid_command"), raw
    assert error(post(server, run_id, b"{not json")) == (422, "invalid_request")
    assert call(server, "GET", f"/api/v1/runs/{run_id}/commands") == (200, [])


def test_an_unknown_run_is_404_and_a_finished_one_409(server: ServerProcess) -> None:
    assert error(post(server, 999, {"kind": "pause"})) == (404, "run_not_found")
    assert error(call(server, "GET", "/api/v1/runs/999/commands")) == (404, "run_not_found")
    assert error(call(server, "GET", "/api/v1/runs/999/commands/x")) == (404, "run_not_found")
    agent = WireAgent(server, "done")
    with agent:
        status, sent = post(server, agent.run_id, {"id": "before-bye", "kind": "pause"})
        assert status == 201
        assert recv_frame(agent.ws)["id"] == "before-bye"
        assert agent.bye() == 1000
    status, body = post(server, agent.run_id, {"kind": "pause"})
    assert (status, body["error"]["code"]) == (409, "run_finished")
    assert "finished" in body["error"]["message"]
    # a retry of a command sent before the run finished still gets its stored answer
    assert post(server, agent.run_id, {"id": "before-bye", "kind": "pause"}) == (200, sent)
    assert error(call(server, "GET", f"/api/v1/runs/{agent.run_id}/commands/nope")) == (404, "command_not_found")


@pytest.fixture
def auth_server(migrated_db: str, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(migrated_db, tmp_path / "server.log", extra_args=[])
    proc.start()
    yield proc
    proc.stop()


def _tokens(db_url: str, *names: str) -> dict[str, str]:
    """A token per name, whose scopes are the name ("read", "control", ...)."""
    engine = make_engine(db_url)
    try:
        return {name: create_token(Store(engine), name, frozenset(name.split("+"))) for name in names}
    finally:
        engine.dispose()


def _run_with_token(server: ServerProcess, token: str) -> int:
    url = server.url.replace("http://", "ws://") + protocol.WS_PATH
    with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10) as ws:
        hello = protocol.hello_frame(
            uid="scoped", project="p", name="scoped", resume_from_seq=1, agent_version="", host="", pid=1
        )
        ws.send(protocol.encode(hello))
        welcome = recv_frame(ws)
    run_id: int = welcome["run_id"]
    return run_id


def test_sending_needs_the_control_scope_and_records_the_token_name(
    auth_server: ServerProcess, migrated_db: str
) -> None:
    tokens = _tokens(migrated_db, "ingest", "read", "control", "read+control")
    run_id = _run_with_token(auth_server, tokens["ingest"])
    body = {"kind": "skip_batches", "args": {"n": 1}}
    assert error(post(auth_server, run_id, body)) == (401, "unauthorized")
    for weak in ("ingest", "read"):
        status, answer = post(auth_server, run_id, body, tokens[weak])
        assert (status, answer["error"]["code"]) == (403, "forbidden")
        assert "'control'" in answer["error"]["message"]
    # the scope is checked before the body: a bad body from a read token is still 403
    assert error(post(auth_server, run_id, {"kind": "bogus kind"}, tokens["read"])) == (403, "forbidden")
    status, sent = post(auth_server, run_id, body, tokens["read+control"])
    assert status == 201 and sent["created_by"] == "read+control"
    listing = f"/api/v1/runs/{run_id}/commands"
    assert call(auth_server, "GET", listing, token=tokens["read"]) == (200, [sent])
    assert error(call(auth_server, "GET", listing, token=tokens["control"])) == (403, "forbidden")
    assert error(call(auth_server, "GET", f"{listing}/{sent['id']}", token=tokens["ingest"])) == (403, "forbidden")
