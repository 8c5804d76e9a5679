"""Autopilot policies over REST on a real server (SQLite and PostgreSQL): project and run
policies, the effective one and its source, the set_autopilot commands each change sends to
the run's agents (hand-driven websockets), the 422s, 404s and scopes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServerProcess, recv_frame
from tests.server.wire import WireAgent
from trimtab.autopilot import AutopilotOptions
from trimtab.server.commands.kinds import AUTOPILOT_OPTIONS, autopilot_problem
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store
from trimtab.server.tokens import create_token

ANON = "anonymous (auth disabled)"


def call(server: ServerProcess, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + "/api/v1" + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def ok(result: tuple[int, Any]) -> dict[str, Any]:
    status, body = result
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def error(result: tuple[int, Any]) -> tuple[int, str, str]:
    status, body = result
    assert set(body) == {"error"}, body
    return status, body["error"]["code"], body["error"]["message"]


def sent_args(view: dict[str, Any], run_id: int) -> list[dict[str, Any]]:
    """The args of the set_autopilot commands a write says it sent to ``run_id``."""
    for command in view["commands"]:
        assert command["kind"] == "set_autopilot" and command["status"] == "pending" and command["source"] == "human"
    return [c["args"] for c in view["commands"] if c["run_id"] == run_id]


def received(agent: WireAgent) -> dict[str, Any]:
    frame = recv_frame(agent.ws)
    assert frame["t"] == "cmd" and frame["kind"] == "set_autopilot", frame
    return frame


def commands_of(server: ServerProcess, run_id: int) -> list[dict[str, Any]]:
    return ok(call(server, "GET", f"/runs/{run_id}/commands"))  # type: ignore[return-value]


def test_the_option_list_is_the_agents(server: ServerProcess) -> None:
    """The server's list comes from AutopilotOptions itself; the agent's defaults are valid."""
    assert list(AUTOPILOT_OPTIONS) == [f.name for f in fields(AutopilotOptions)] == AutopilotOptions.names()
    assert set(AUTOPILOT_OPTIONS.values()) <= {bool, int, float}  # the types the check knows
    defaults = {f.name: f.default for f in fields(AutopilotOptions)}
    assert autopilot_problem({"enabled": True, **defaults}) is None
    # and the policy an agent is sent is exactly what it accepts
    run_id = _live(server, "kinds", "k")
    status, command = call(server, "POST", f"/runs/{run_id}/commands", {"kind": "set_autopilot", "args": defaults})
    assert status == 201 and command["args"] == defaults


def _live(server: ServerProcess, uid: str, project: str) -> int:
    with WireAgent(server, uid, project=project) as agent:
        return agent.run_id


def test_project_and_run_policies_are_sent_to_the_runs_they_change(server: ServerProcess) -> None:
    empty = ok(call(server, "GET", "/projects/ops/autopilot"))
    assert empty == {
        "project": "ops",
        "run_id": None,
        "source": "none",
        "policy": None,
        "updated_at": None,
        "updated_by": None,
        "commands": [],
    }
    assert error(call(server, "DELETE", "/projects/ops/autopilot"))[:2] == (404, "policy_not_found")

    # before any run: stored (the project is created), nothing to send
    put = ok(call(server, "PUT", "/projects/ops/autopilot", {"spike_z": 20}))
    assert (put["source"], put["policy"], put["updated_by"], put["commands"]) == (
        "project",
        {"enabled": True, "spike_z": 20},
        ANON,
        [],
    )
    assert ok(call(server, "GET", "/projects/ops/autopilot")) == put

    with WireAgent(server, "new-run", project="ops") as agent:
        run_id = agent.run_id
        # a new run gets the project's policy right after welcome
        first = received(agent)
        assert first["args"] == {"enabled": True, "spike_z": 20}
        (stored,) = commands_of(server, run_id)
        assert (stored["id"], stored["kind"], stored["created_by"], stored["source"]) == (
            first["id"],
            "set_autopilot",
            "policy",
            "human",
        )
        view = ok(call(server, "GET", f"/runs/{run_id}/autopilot"))
        assert (view["project"], view["run_id"], view["source"], view["policy"]) == (
            "ops",
            run_id,
            "project",
            {"enabled": True, "spike_z": 20},
        )

        # the same policy again changes nothing: nothing is sent
        assert ok(call(server, "PUT", "/projects/ops/autopilot", {"enabled": True, "spike_z": 20}))["commands"] == []
        # a new project policy reaches the running run
        changed = ok(call(server, "PUT", "/projects/ops/autopilot", {"spike_z": 30, "reduce_lr": False}))
        assert sent_args(changed, run_id) == [{"enabled": True, "spike_z": 30, "reduce_lr": False}]
        assert received(agent)["id"] == changed["commands"][0]["id"]

        # the run's own policy wins over the project's
        own = ok(call(server, "PUT", f"/runs/{run_id}/autopilot", {"enabled": False}))
        assert (own["source"], own["policy"], sent_args(own, run_id)) == (
            "run",
            {"enabled": False},
            [{"enabled": False}],
        )
        assert received(agent)["args"] == {"enabled": False}
        assert ok(call(server, "GET", f"/runs/{run_id}/autopilot"))["source"] == "run"
        # ... so a project change no longer goes to it
        assert ok(call(server, "PUT", "/projects/ops/autopilot", {"spike_z": 40}))["commands"] == []

        # deleting the run's policy falls back to the project's, which is sent
        back = ok(call(server, "DELETE", f"/runs/{run_id}/autopilot"))
        assert (back["source"], back["policy"]) == ("project", {"enabled": True, "spike_z": 40})
        assert sent_args(back, run_id) == [{"enabled": True, "spike_z": 40}]
        assert received(agent)["args"] == {"enabled": True, "spike_z": 40}
        assert error(call(server, "DELETE", f"/runs/{run_id}/autopilot"))[:2] == (404, "policy_not_found")

        # deleting the last policy turns the autopilot off
        gone = ok(call(server, "DELETE", "/projects/ops/autopilot"))
        assert (gone["source"], gone["policy"], sent_args(gone, run_id)) == ("none", None, [{"enabled": False}])
        assert received(agent)["args"] == {"enabled": False}
        assert ok(call(server, "GET", f"/runs/{run_id}/autopilot"))["source"] == "none"
        audit = [(c["args"], c["created_by"]) for c in commands_of(server, run_id)]
        assert audit == [
            ({"enabled": True, "spike_z": 20}, "policy"),
            ({"enabled": True, "spike_z": 30, "reduce_lr": False}, ANON),
            ({"enabled": False}, ANON),
            ({"enabled": True, "spike_z": 40}, ANON),
            ({"enabled": False}, ANON),
        ]
        assert agent.bye() == 1000

    # a run created with no policy in force is sent nothing
    assert commands_of(server, _live(server, "no-policy", "ops")) == []
    # a finished run's policy is stored, and not sent: no loop is left to steer
    done = ok(call(server, "PUT", f"/runs/{run_id}/autopilot", {"spike_z": 9}))
    assert (done["source"], done["commands"]) == ("run", [])
    assert len(commands_of(server, run_id)) == 5


def test_a_project_policy_goes_to_every_running_run_without_its_own(server: ServerProcess) -> None:
    with (
        WireAgent(server, "a", project="fleet") as a,
        WireAgent(server, "b", project="fleet") as b,
        WireAgent(server, "c", project="fleet") as c,
        WireAgent(server, "elsewhere", project="other") as other,
    ):
        ok(call(server, "PUT", f"/runs/{b.run_id}/autopilot", {"spike_z": 50}))
        received(b)
        assert c.bye() == 1000
        put = ok(call(server, "PUT", "/projects/fleet/autopilot", {"skip_spikes": False}))
        assert sorted(cmd["run_id"] for cmd in put["commands"]) == [a.run_id]  # not b (own), c (finished)
        assert received(a)["args"] == {"enabled": True, "skip_spikes": False}
        assert commands_of(server, other.run_id) == []
        # both ranks of a new two-rank run get the one command
        with (
            WireAgent(server, "pair", rank=0, world_size=2, project="fleet") as r0,
            WireAgent(server, "pair", rank=1, world_size=2, project="fleet") as r1,
        ):
            assert received(r0)["id"] == received(r1)["id"]
            assert len(commands_of(server, r0.run_id)) == 1


BAD_POLICIES: list[tuple[Any, str]] = [
    ([], "JSON object"),
    ({"enabled": "yes"}, "'enabled'"),
    ({"spike_z": "20"}, "'spike_z'"),
    ({"spike_z": True}, "'spike_z'"),
    ({"skip_spikes": 1}, "'skip_spikes'"),
    ({"max_skips_in_row": 2.5}, "'max_skips_in_row'"),
    ({"skip_window": -1}, "'skip_window'"),
    ({"lr_factor": 1.5}, "lr_factor"),
    ({"divergence_ratio": 1}, "divergence_ratio"),
    ({"spike_z": 20, "aggressive": True}, "'aggressive'"),
]


def test_bad_policies_are_refused_naming_the_field_and_nothing_is_stored(server: ServerProcess) -> None:
    run_id = _live(server, "strict", "strict")
    for body, named in BAD_POLICIES:
        for path in ("/projects/strict/autopilot", f"/runs/{run_id}/autopilot"):
            status, code, message = error(call(server, "PUT", path, body))
            assert (status, code) == (422, "invalid_policy"), (path, body)
            assert named in message, (body, message)
        if isinstance(body, dict):  # the same check guards a set_autopilot command
            status, code, message = error(
                call(server, "POST", f"/runs/{run_id}/commands", {"kind": "set_autopilot", "args": body})
            )
            assert (status, code) == (422, "invalid_command") and named in message, (body, message)
    assert ok(call(server, "GET", f"/runs/{run_id}/autopilot"))["source"] == "none"
    assert ok(call(server, "GET", "/projects/strict/autopilot"))["source"] == "none"
    assert commands_of(server, run_id) == []
    for method in ("GET", "PUT", "DELETE"):
        body = {"enabled": True} if method == "PUT" else None
        assert error(call(server, method, "/runs/999/autopilot", body))[:2] == (404, "run_not_found")


@pytest.fixture
def auth_server(migrated_db: str, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(migrated_db, tmp_path / "server.log", extra_args=[])
    proc.start()
    yield proc
    proc.stop()


def test_writing_needs_control_and_reading_read(auth_server: ServerProcess, migrated_db: str) -> None:
    engine = make_engine(migrated_db)
    try:
        tokens = {
            n: create_token(Store(engine), n, frozenset(n.split("+"))) for n in ("read", "control", "alice+control")
        }
    finally:
        engine.dispose()
    path = "/projects/sec/autopilot"
    assert error(call(auth_server, "PUT", path, {"spike_z": 20}))[:2] == (401, "unauthorized")
    assert error(call(auth_server, "PUT", path, {"spike_z": 20}, tokens["read"]))[:2] == (403, "forbidden")
    assert error(call(auth_server, "DELETE", path, token=tokens["read"]))[:2] == (403, "forbidden")
    assert error(call(auth_server, "GET", path, token=tokens["control"]))[:2] == (403, "forbidden")
    put = ok(call(auth_server, "PUT", path, {"spike_z": 20}, tokens["alice+control"]))
    assert put["updated_by"] == "alice+control"
    assert ok(call(auth_server, "GET", path, token=tokens["read"]))["policy"] == {"enabled": True, "spike_z": 20}
    assert ok(call(auth_server, "DELETE", path, token=tokens["control"]))["source"] == "none"
