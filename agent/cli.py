"""The ``trimtab`` command: its argument parser, and a dispatcher to the server's and the
dashboard's commands (``trimtab.server.cli``, ``trimtab.dashboard.serve``), imported only
when run, so the agent-only install still has a working ``trimtab --help`` and a clear
message for the rest."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from trimtab.version import __version__

_NEEDS_SERVER = "this command needs the server extra: pip install 'trimtab[server]'"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trimtab", description="Keep long training runs steady.")
    parser.add_argument("--version", action="version", version=f"trimtab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    server = sub.add_parser("server", help="run the trimtab server (API, agent ingest)")
    server.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=None, help="port (default 8000)")
    server.add_argument("--db", default=None, help="database URL (default: a SQLite file in --data-dir)")
    server.add_argument("--data-dir", default=None, help="where the embedded SQLite database lives")
    server.add_argument("--no-auth", action="store_true", help="disable tokens (loopback binds only)")
    server.add_argument("--auto-upgrade", action="store_true", help="migrate the database on start")

    server.add_argument("--no-dashboard", action="store_true", help="serve the API only (/ redirects to /docs)")

    ui = sub.add_parser("dashboard", help="serve the dashboard alone, against a trimtab API elsewhere")
    ui.add_argument("--api-url", required=True, help="the trimtab server, e.g. https://trimtab.example.com")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=8050, help="port (default 8050)")
    ui.add_argument(
        "--session-secret",
        default=None,
        help="signs session cookies (default: $TRIMTAB_SESSION_SECRET, else random: sessions end at a restart)",
    )

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    for name, text in (
        ("upgrade", "migrate the database to this version's schema"),
        ("current", "print the schema revision"),
    ):
        cmd = db_sub.add_parser(name, help=text)
        cmd.add_argument("--db", default=None, help="database URL (default: the embedded SQLite file)")
        cmd.add_argument("--data-dir", default=None)

    token = sub.add_parser("token", help="API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a token and print it (shown once)")
    create.add_argument("--scopes", required=True, help="comma-separated: ingest,read,control,admin")
    create.add_argument("--name", default="token", help="a label to recognise it by")
    create.add_argument("--db", default=None)
    create.add_argument("--data-dir", default=None)
    listing = token_sub.add_parser("list", help="list tokens (never their secrets)")
    revoke = token_sub.add_parser("revoke", help="revoke a token by id (effective within 10 s)")
    revoke.add_argument("id", type=int)
    for cmd in (listing, revoke):
        cmd.add_argument("--db", default=None)
        cmd.add_argument("--data-dir", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:  # the only place the agent package reaches into the server and the dashboard
        if args.command == "dashboard":
            from trimtab.dashboard.serve import run_command
        else:
            from trimtab.server.cli import run_command
    except ImportError:
        print(f"trimtab: {_NEEDS_SERVER}", file=sys.stderr)
        return 2
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
