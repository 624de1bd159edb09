#!/usr/bin/env bash
# The CHES study (conf/experiment/ches_filter.yaml): DPO with and without the top-CHES decile of training pairs,
# 3 seeds, then per seed `prefopt inspect` of the unfiltered run's policy (CHES against each pair's chosen change),
# the pooled Spearman correlation (scripts/ches_correlation.py) and the paired report.
#   bash scripts/ches_study.sh [extra hydra overrides]     (6 training jobs + 3 inspections)
set -euo pipefail
cd "$(dirname "$0")/.."
PREFOPT=(${PREFOPT:-.venv/bin/prefopt})  # a command, e.g. "python -m prefopt.cli"
PYTHON=${PYTHON:-.venv/bin/python}
SWEEP_DIR=${SWEEP_DIR:-multirun/ches_filter/$(date +%Y%m%d_%H%M%S)}
"${PREFOPT[@]}" train -m +experiment=ches_filter hydra.sweep.dir="$SWEEP_DIR" "$@" || echo "some jobs failed: the report marks them"
inspections=()
for job in "$SWEEP_DIR"/[0-9]*; do
  if grep -q "^- dataset.filter.quantile=1.0$" "$job/overrides.yaml"; then  # a baseline job: every pair kept
    "${PREFOPT[@]}" inspect inspect.policy="$job" hardware=cpu inspect.split=train hydra.run.dir="$job/inspect"
    inspections+=("$job/inspect")
  fi
done
"$PYTHON" scripts/ches_correlation.py "${inspections[@]}" | tee "$SWEEP_DIR/ches_correlation.md"
"${PREFOPT[@]}" report "$SWEEP_DIR" --group-by dataset.filter.quantile --baseline dataset.filter.quantile=1.0
echo "study: $SWEEP_DIR/ches_correlation.md and $SWEEP_DIR/report_groups.md"
