"""Words the agent and the server must agree on are named once (``trimtab.protocol``), and
both sides use those names: command kinds, command statuses, event kinds."""

from __future__ import annotations

import ast
from pathlib import Path

from trimtab import protocol
from trimtab.builtin_commands import BUILTINS
from trimtab.server.commands import kinds, store

ROOT = Path(__file__).resolve().parent.parent


def test_the_agent_implements_and_the_server_validates_the_same_builtin_commands() -> None:
    assert tuple(BUILTINS) == protocol.BUILTIN_COMMANDS
    assert tuple(kinds.BUILTIN_KINDS) == protocol.BUILTIN_COMMANDS


def test_command_statuses_the_agent_reports_are_the_servers() -> None:
    assert set(protocol.RESULT_STATUSES) < set(store.STATUSES)  # the server's add pending and expired
    assert set(store.FINAL) == {protocol.APPLIED, protocol.REJECTED, store.EXPIRED}


def test_every_event_the_agent_emits_is_a_named_kind() -> None:
    kinds_used: list[str] = []
    for path in sorted((ROOT / "agent").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "emit_event" and node.args:
                first = node.args[0]
                assert not isinstance(first, ast.Constant), f"{path.name}:{node.lineno}: name the event kind"
                kinds_used.append(ast.unparse(first))
    named = {name for name in dir(protocol) if name.startswith("EVENT_") and name != "EVENT_KINDS"}
    assert {k for k in kinds_used if k != "kind"} <= named  # RunSink.emit_event passes its own argument on
    assert {getattr(protocol, n) for n in named} == set(protocol.EVENT_KINDS)
    assert len(kinds_used) >= 3
