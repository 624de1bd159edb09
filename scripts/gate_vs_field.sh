#!/usr/bin/env bash
# The Gate-DPO study (conf/experiment/gate_vs_field.yaml): 8 losses x 2 regimes x 3 seeds on SmolLM2-135M,
# then the seed statistics: mean ± 95% t-interval per loss and regime, paired differences against dpo in the
# same regime, and the trajectory bands.
#   bash scripts/gate_vs_field.sh [extra hydra overrides]      (48 jobs; ~1.3 min each alone on 2 CPU cores: 63 min)
#   PUBLISH_DIR=docs/gate_vs_field bash scripts/gate_vs_field.sh   (also copies the report files there, as docs/ holds them)
set -euo pipefail
cd "$(dirname "$0")/.."
PREFOPT=(${PREFOPT:-.venv/bin/prefopt})  # a command, e.g. "python -m prefopt.cli"
SWEEP_DIR=${SWEEP_DIR:-multirun/gate_vs_field/$(date +%Y%m%d_%H%M%S)}
"${PREFOPT[@]}" train -m +experiment=gate_vs_field hydra.sweep.dir="$SWEEP_DIR" "$@" || echo "some jobs failed: the report marks them"
"${PREFOPT[@]}" report "$SWEEP_DIR" --group-by loss,dataset.arith.rejected_style --baseline loss=dpo
echo "study: $SWEEP_DIR/report_groups.md  bands: $SWEEP_DIR/report_bands.png"
if [[ -n "${PUBLISH_DIR:-}" ]]; then
  mkdir -p "$PUBLISH_DIR"
  cp "$SWEEP_DIR"/report_groups.md "$SWEEP_DIR"/report_groups.csv "$SWEEP_DIR"/report_bands.png "$SWEEP_DIR"/report.md "$PUBLISH_DIR"/
  echo "copied the report into $PUBLISH_DIR"
fi
