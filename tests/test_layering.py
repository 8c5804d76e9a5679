"""The layering of DESIGN.md, checked on the source: which package may import which.

- ``trimtab.dashboard`` never imports ``trimtab.server``: it reads data only through the REST API.
- The agent (``trimtab``, what a training script imports) never imports the server or the
  dashboard; only the CLI dispatcher (``trimtab.cli``) reaches them, when a command runs.
- Inside the server, each wing imports only the wings below it (table ``ALLOWED``), and no
  module imports itself back through others (no cycles, lazy imports included).

Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"agent": "trimtab", "server": "trimtab.server", "dashboard": "trimtab.dashboard"}

# A server wing -> the wings it may import (itself included where listed). The agent's
# modules (trimtab.protocol, trimtab.errors, ...) are open to every wing.
BELOW_API = {"db", "settings", "tokens", "auth", "ingest", "alerts", "commands", "context"}
ALLOWED: dict[str, set[str]] = {
    "db": {"db"},
    "settings": set(),
    "tokens": {"db"},
    "auth": {"db", "tokens"},
    "ingest": {"db"},
    "alerts": {"db", "alerts", "settings"},
    "commands": {"db", "commands"},
    "context": {"db", "settings", "tokens", "auth", "ingest", "alerts", "commands"},
    "api": BELOW_API | {"api"},
    "app": BELOW_API | {"api"},
    "serve": BELOW_API | {"api", "app"},
    "cli": BELOW_API | {"api", "app", "serve"},
}


def modules() -> dict[str, Path]:
    """Every module of the three packages, by its import name."""
    found: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, for type checking only) for every import in the file, relative
    ones resolved."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    typing_only: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                typing_only.update(ast.walk(child))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, node in typing_only
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")
                parent = parent[: len(parent) - node.level + (1 if is_package else 0)]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in known else base), node.lineno, node in typing_only


def wing(module: str) -> str | None:
    """The server wing of a module (``db``, ``api``, ..., or a top-level module's name)."""
    if not module.startswith("trimtab.server."):
        return None
    return module.split(".")[2]


def graph(runtime_only: bool = False) -> dict[str, list[tuple[str, int]]]:
    """Module -> the trimtab modules it imports (with the line); ``runtime_only`` leaves out
    imports made for type checking only."""
    found = modules()
    known = set(found)
    return {
        name: [
            (m, line)
            for m, line, typing_only in imports(name, path, known)
            if m.startswith("trimtab") and not (runtime_only and typing_only)
        ]
        for name, path in found.items()
    }


def test_the_dashboard_never_imports_the_server() -> None:
    bad = [
        f"{m} line {line} imports {target}"
        for m, targets in graph().items()
        if m.startswith("trimtab.dashboard")
        for target, line in targets
        if target.startswith("trimtab.server")
    ]
    assert bad == []


def test_the_agent_imports_neither_server_nor_dashboard_except_the_cli_dispatcher() -> None:
    bad = [
        f"{m} line {line} imports {target}"
        for m, targets in graph().items()
        if not m.startswith(("trimtab.server", "trimtab.dashboard")) and m != "trimtab.cli"
        for target, line in targets
        if target.startswith(("trimtab.server", "trimtab.dashboard", "trimtab.migrations"))
    ]
    assert bad == []


def test_server_wings_import_only_the_wings_below_them() -> None:
    bad = []
    for m, targets in graph().items():
        own = wing(m)
        if own is None or own == "__init__":
            continue
        assert own in ALLOWED, f"{m}: a new server module or wing; give it a row in ALLOWED"
        for target, line in targets:
            other = wing(target)
            if other is not None and other != "__init__" and other not in ALLOWED[own] and other != own:
                bad.append(f"{m} line {line} imports {target} ({own} -> {other})")
            if target.startswith("trimtab.dashboard") and own not in ("app", "serve", "cli"):
                bad.append(f"{m} line {line} imports {target}: only the entry points mount the dashboard")
    assert bad == []


def test_no_import_cycles() -> None:
    """Imports for type checking only may point back (a type in a signature); real ones may not."""
    edges = {m: {t for t, _ in targets if t != m} for m, targets in graph(runtime_only=True).items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt in edges and nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_checks_see_a_violation() -> None:
    """The walker finds lazy and relative imports (so the tests above could fail)."""
    source = (
        "def f():\n    from trimtab.server.db import store\n    from ..api import deps\n"
        "if TYPE_CHECKING:\n    from trimtab.server.app import create_app\n"
    )
    probe = ROOT / "build" / "layering_probe.py"
    probe.parent.mkdir(exist_ok=True)
    probe.write_text(source)
    try:
        known = {"trimtab.server.db.store", "trimtab.server.api.deps", "trimtab.server.app"}
        found = {m: typing_only for m, _, typing_only in imports("trimtab.server.alerts.x", probe, known)}
    finally:
        probe.unlink()
    assert found == {"trimtab.server.db.store": False, "trimtab.server.api.deps": False, "trimtab.server.app": True}
    assert wing("trimtab.server.api.deps") == "api" and "api" not in ALLOWED["alerts"]


def test_no_module_over_500_lines() -> None:
    """Small modules named for what they do (STYLE.md): a module past 500 lines has a seam."""
    long = {
        str(path.relative_to(ROOT)): n for path in modules().values() if (n := len(path.read_text().splitlines())) > 500
    }
    assert long == {}
