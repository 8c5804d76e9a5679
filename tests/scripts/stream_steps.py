"""A training-loop stand-in run as a subprocess by the streaming tests.

Logs ``loss`` and ``grad_norm`` for --steps steps with the value pattern of
``tests.helpers.value_for``; prints ``RUN_ID <id>`` and ``FINISH <ok>``, or, with
--hang-after-logging, prints ``LOGGED`` and waits to be killed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import trimtab
from tests.helpers import value_for
from trimtab import internal


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--spool", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--pause-every", type=int, default=0)
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--finish-timeout", type=float, default=90.0)
    p.add_argument("--hang-after-logging", action="store_true")
    args = p.parse_args()

    run = trimtab.init(
        server=args.server, project="tests", name=args.name, spool_dir=args.spool, max_backoff=1.0, flush_interval=0.05
    )
    for step in range(args.steps):
        run.log({"loss": value_for("loss", step), "grad_norm": value_for("grad_norm", step)}, step=step)
        if args.pause_every and step % args.pause_every == args.pause_every - 1:
            time.sleep(args.pause)
    if args.hang_after_logging:
        time.sleep(1.0)  # the sender writes everything logged to the spool within its flush interval
        print("LOGGED", flush=True)
        time.sleep(600)
        return 1
    ok = run.finish(timeout=args.finish_timeout)
    print(f"RUN_ID {run.id}", flush=True)
    print(f"FINISH {ok}", flush=True)
    print(f"DROPS {run.stats()['drops']}", flush=True)
    return 0 if ok and internal.error_count() == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
