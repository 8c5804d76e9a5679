"""Every REST route says what it does: its docstring becomes its OpenAPI description."""

from __future__ import annotations

import ast
from pathlib import Path

ROUTE_DECORATORS = {"get", "post", "put", "delete", "patch", "websocket"}


def test_every_route_has_a_docstring() -> None:
    missing = []
    for path in sorted((Path(__file__).resolve().parents[2] / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for deco in node.decorator_list:
                call = deco.func if isinstance(deco, ast.Call) else None
                hidden = isinstance(deco, ast.Call) and any(
                    k.arg == "include_in_schema" and isinstance(k.value, ast.Constant) and k.value.value is False
                    for k in deco.keywords
                )
                routed = isinstance(call, ast.Attribute) and call.attr in ROUTE_DECORATORS and not hidden
                if routed and not ast.get_docstring(node):
                    missing.append(f"{path.name}:{node.lineno} {node.name}")
    assert missing == []
