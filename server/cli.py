"""The server's commands of the ``trimtab`` CLI: ``server``, ``db`` and ``token``. The
argument parser lives in the agent package (``trimtab.cli``), so that ``trimtab --help``
works without the server extra; this module gets the parsed arguments."""

from __future__ import annotations

import argparse
import sys

from trimtab.errors import TrimtabError
from trimtab.server.db import migrate
from trimtab.server.db.engine import make_engine
from trimtab.server.db.store import Store
from trimtab.server.settings import Settings
from trimtab.server.tokens import create_token, list_tokens, parse_scopes, revoke_token


def run_command(args: argparse.Namespace) -> int:
    """Run ``trimtab server|db|token`` with its parsed arguments; the exit status."""
    settings = _settings(args)
    if args.command == "server":
        from trimtab.server.serve import serve

        return serve(settings)
    if args.command == "db":
        return _db(args, settings)
    if args.command == "token":
        return _token(args, settings)
    return 2


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "db_url": args.db,
        "data_dir": args.data_dir,
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
    }
    if getattr(args, "no_auth", False):
        overrides["auth"] = False
    if getattr(args, "auto_upgrade", False):
        overrides["auto_upgrade"] = True
    if getattr(args, "no_dashboard", False):
        overrides["dashboard"] = False
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _db(args: argparse.Namespace, settings: Settings) -> int:
    if args.db_command == "upgrade":
        migrate.upgrade(settings.database_url)
        print(f"trimtab: database at revision {migrate.head_revision()}")
        return 0
    engine = make_engine(settings.database_url)
    try:
        print(migrate.current_revision(engine) or "(empty: run `trimtab db upgrade`)")
    finally:
        engine.dispose()
    return 0


def _token(args: argparse.Namespace, settings: Settings) -> int:
    engine = make_engine(settings.database_url)
    try:
        migrate.check_schema(engine, settings.database_url)
        store = Store(engine)
        if args.token_command == "create":
            print(create_token(store, args.name, parse_scopes(args.scopes)))
        elif args.token_command == "revoke":
            revoke_token(store, args.id)
            print(f"trimtab: token {args.id} revoked")
        else:
            print(f"{'id':>4}  {'name':<20} {'prefix':<12} {'scopes':<28} state")
            for t in list_tokens(store):
                state = "revoked" if t["revoked_at"] else "active"
                print(f"{t['id']:>4}  {t['name']:<20} {t['prefix']:<12} {t['scopes']:<28} {state}")
    except TrimtabError as exc:
        print(f"trimtab: {exc.message}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0
