"""Multi-rank commands: two gloo DDP processes get the same commands at different steps (and
in a different order); both apply each at the same step, the one after rank 0 got it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, free_port, subprocess_env


def run_ranks(tmp_path: Path, arrivals: list[dict[int, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    init = f"tcp://127.0.0.1:{free_port()}"
    server = f"http://127.0.0.1:{free_port()}"  # nobody listens: the ranks spool, commands are injected
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "scripts" / "ddp_lockstep.py"),
                *("--init", init, "--rank", str(rank), "--spool", str(tmp_path / f"spool{rank}")),
                *("--server", server, "--arrivals", json.dumps(arrivals[rank])),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(),
            cwd=ROOT,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    results = []
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
        (line,) = [x for x in out.splitlines() if x.startswith("RESULT ")]
        results.append(json.loads(line.removeprefix("RESULT ")))
    return results


def test_ranks_apply_each_command_at_the_same_step(tmp_path: Path) -> None:
    reduce = {"id": "c1", "kind": "reduce_lr", "args": {"factor": 0.5}}
    skip = {"id": "c2", "kind": "skip_batches", "args": {"n": 2}}
    # rank 0 hears of reduce at step 3 and skip at step 8; rank 1 of skip first, at step 2
    rank0, rank1 = run_ranks(tmp_path, [{3: [reduce], 8: [skip]}, {2: [skip], 6: [reduce]}])
    for result in (rank0, rank1):
        assert [(h["id"], h["status"], h["step"]) for h in result["history"]] == [
            ("c1", "applied", 4),
            ("c2", "applied", 9),
        ]
        assert result["lrs"][3] == 0.1 and result["lrs"][4] == 0.05
    assert rank0["weights"] == rank1["weights"]  # the skipped updates were skipped on both ranks
