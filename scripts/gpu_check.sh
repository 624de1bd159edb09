#!/usr/bin/env bash
# prefopt's GPU check: ONE command, one markdown table (stdout, and $OUT/gpu_check.md when $OUT is set).
# README's GPU section says no GPU figure exists until this is run on one; this is the run that makes them.
#
#   bash scripts/gpu_check.sh               # one H100/H200, a fresh copy of the repo: under 8 minutes
#   bash scripts/gpu_check.sh --cpu-smoke   # every part on the CPU, tiny shapes, gloo (tests the plumbing)
#   bash scripts/gpu_check.sh --parts exactness,throughput
#
# What it needs, in the order it looks for it:
#   1. ./.venv/bin/python, when a .venv exists (scripts/install.sh made it);
#   2. no .venv and a package registry reachable: a .venv with --system-site-packages (so the machine's CUDA
#      torch is kept; scripts/install.sh would pin the CPU build) and `pip install -e .` into it;
#   3. no .venv, wheels in $PREFOPT_WHEELS (default ./wheels): the same .venv, installed from them with
#      --no-index (bring them from a machine with internet: `pip download`/`pip wheel` for the GPU's Python);
#   4. else the system python3 as it is.
# GPU_CHECK_PYTHON=/path/to/python skips all of that: that Python, nothing installed.
# The chosen Python must import torch, transformers and prefopt's core (omegaconf, PyYAML); on a GPU run torch
# must see CUDA. If not, it prints one line naming what is missing and exits 2. Optional, each a SKIP row when
# absent: hydra-core + datasets (the `prefopt train` rows, bf16 runs), deepspeed (the ZeRO-3 row), trl.
# Exit status: 0 all checks passed or skipped, 1 some check failed, 2 missing requirements.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
for arg in "$@"; do [ "$arg" = "--cpu-smoke" ] && SMOKE=1; done

registry_reachable() {
  timeout 8 python3 - <<'PY' >/dev/null 2>&1
import urllib.request
urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5)
PY
}

PY=python3
WHEELS=${PREFOPT_WHEELS:-wheels}
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY=$GPU_CHECK_PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
elif command -v python3 >/dev/null && registry_reachable; then
  echo "[gpu_check] no .venv, a registry answers: .venv (system site packages kept) + pip install -e ." >&2
  python3 -m venv --system-site-packages .venv && .venv/bin/python -m pip install --quiet -e ".[test]" >&2 \
    && PY=.venv/bin/python
elif [ -d "$WHEELS" ] && command -v python3 >/dev/null; then
  echo "[gpu_check] no .venv, no registry: installing from $WHEELS (--no-index)" >&2
  python3 -m venv --system-site-packages .venv \
    && .venv/bin/python -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl >&2 \
    && PY=.venv/bin/python
fi

if ! command -v "$PY" >/dev/null; then
  echo "gpu_check: missing: python3" && exit 2
fi
MISSING=$("$PY" - "$SMOKE" <<'PY'
import sys
missing = []
for module in ("torch", "transformers", "omegaconf", "yaml"):
    try:
        __import__(module)
    except Exception:
        missing.append({"yaml": "PyYAML"}.get(module, module))
if not missing and sys.argv[1] != "1":
    import torch
    if not torch.cuda.is_available():
        missing.append(f"a CUDA device (torch {torch.__version__} sees none; --cpu-smoke runs without)")
hint = " (no registry here? bring wheels in ./wheels or $PREFOPT_WHEELS)" if missing and "torch" not in missing[-1] else ""
print(", ".join(missing) + hint)
PY
)
if [ -n "$MISSING" ]; then
  echo "gpu_check: missing with $PY: $MISSING"
  exit 2
fi
exec "$PY" scripts/gpu_check.py "$@"
