"""``scripts/gpu_check.sh`` runs on a GPU machine only now and then: its toy-size mode runs
here, on the CPU, so the script, the benchmark flags it passes and its summary cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_end_to_end_at_toy_size(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "GPU_CHECK_SMOKE": "1",
        "GPU_CHECK_DIR": str(tmp_path / "work"),
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
    }
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.split("== summary", 1)[1]
    assert "test_bf16_autocast_run_never_synchronises_off_sampled_steps[fused]" in summary
    assert "every-step: median-step ratio / amortised ratio" in summary
    assert "default: median-step ratio / amortised ratio" in summary
    assert "exit codes (tests, benchmark)" in summary and summary.rstrip().endswith("0, 0")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"cuda_tests.log", "cuda_tests.xml", "overhead.log"}
