#!/usr/bin/env bash
# The squeezing-effect demo on CPU (~30 min on 2 cores): SmolLM2-135M, arith pairs with off-policy
# rejected responses, one job per loss (dpo, gate_dpo, ipo, cal_dpo, lpo), then the report table + plot.
#   bash scripts/squeeze_demo.sh [extra hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
PREFOPT=(${PREFOPT:-.venv/bin/prefopt})  # a command, e.g. "python -m prefopt.cli"
SWEEP_DIR=${SWEEP_DIR:-multirun/squeeze_demo_$(date +%Y%m%d_%H%M%S)}
"${PREFOPT[@]}" train -m +experiment=squeeze_demo hydra.sweep.dir="$SWEEP_DIR" "$@"
"${PREFOPT[@]}" report "$SWEEP_DIR"
echo "report: $SWEEP_DIR/report.md  plot: $SWEEP_DIR/report.png"
