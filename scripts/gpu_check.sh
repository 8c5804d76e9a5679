#!/usr/bin/env bash
# The agent's CUDA checks in one command (under 10 minutes on one GPU):
#   1. the CUDA tests: no host synchronisation on non-sampled steps (fp32, fp16 + GradScaler,
#      bf16 autocast, fused AdamW), the lagged NaN copy, fp16 overflow skips, commands,
#      snapshots and rollback, the autopilot on the GPU;
#   2. benchmarks/agent_overhead.py on a 110 M-parameter GPT under bf16 autocast: step-time
#      ratios with and without the agent, and the host synchronisations of non-sampled steps.
# It ends with one summary table. Needs torch with CUDA, pytest, pytest-timeout, websockets and
# msgpack importable by $PYTHON (default python3); trimtab itself is put on the path from
# this checkout (agent/ is the package trimtab), nothing is installed.
#
#   scripts/gpu_check.sh            the whole check (needs a CUDA device)
#   GPU_CHECK_SMOKE=1 scripts/gpu_check.sh
#                                   the same steps at toy size; runs on a CPU (the CUDA tests
#                                   then skip): what the test suite runs so this script cannot rot
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SMOKE=${GPU_CHECK_SMOKE:-0}
work=${GPU_CHECK_DIR:-build/gpu_check}
log_dir=${OUT:-$work}
mkdir -p "$work" "$log_dir"

# The package layout without an install: $work/site/trimtab -> agent/*.
rm -rf "$work/site" && mkdir -p "$work/site/trimtab"
for f in "$PWD"/agent/*; do ln -s "$f" "$work/site/trimtab/"; done
export PYTHONPATH="$PWD/$work/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

echo "== machine"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
if [ "$SMOKE" != 1 ] && ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device; GPU_CHECK_SMOKE=1 runs the toy-size steps on a CPU" >&2
  exit 2
fi

echo "== CUDA tests"
"$PYTHON" -m pytest -p no:cacheprovider -o addopts="" -q -rA --timeout 300 \
  --junitxml="$log_dir/cuda_tests.xml" tests/agent/test_cuda_sync.py tests/agent/test_cuda_paths.py \
  2>&1 | tee "$log_dir/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== agent overhead"
if [ "$SMOKE" = 1 ]; then
  bench=(--device cpu --model small --steps 4 --block 2 --skip-histc)
else
  bench=(--device cuda --model gpt100m --amp bf16 --steps 300 --block 10 ${GPU_CHECK_PROFILE:+--profile})
fi
"$PYTHON" benchmarks/agent_overhead.py "${bench[@]}" 2>&1 | tee "$log_dir/overhead.log"
bench_rc=${PIPESTATUS[0]}

echo "== summary"
"$PYTHON" - "$log_dir" "$tests_rc" "$bench_rc" <<'PY'
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, tests_rc, bench_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = []
try:
    suite = ET.parse(out / "cuda_tests.xml").getroot()
    for case in suite.iter("testcase"):
        verdict = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                verdict = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
        rows.append((f"test {case.get('name')}", verdict))
except (OSError, ET.ParseError) as exc:
    rows.append(("CUDA tests", f"no report ({exc})"))
bench = (out / "overhead.log").read_text() if (out / "overhead.log").exists() else ""
for line in bench.splitlines():
    if line.startswith("model:"):
        rows.append(("benchmark model", line.removeprefix("model: ")[:100]))
    m = re.match(r"(every-step|default)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(.*)", line)
    if m:
        rows.append((f"{m[1]}: median-step ratio / amortised ratio", f"{m[3]} / {m[5]} (in run.step {m[6].strip()})"))
    if line.startswith(("sampled step", "host synchronisations")):
        rows.append(tuple(line.split(": ", 1)) if ": " in line else (line, ""))
rows.append(("exit codes (tests, benchmark)", f"{tests_rc}, {bench_rc}"))
width = max(len(r[0]) for r in rows)
for name, value in rows:
    print(f"{name:<{width}}  {value}")
PY
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
