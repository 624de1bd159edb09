#!/usr/bin/env bash
# The Gate-DPO study (conf/experiment/gate_vs_field.yaml): 8 losses x 2 regimes x 3 seeds on SmolLM2-135M, then the
# seed statistics (docs/gate_vs_field.md). Kept as the name that page and README use; scripts/study.sh does the work.
#   bash scripts/gate_vs_field.sh [extra hydra overrides]      (48 jobs; ~1.3 min each alone on 2 CPU cores: 63 min)
#   PUBLISH_DIR=docs/gate_vs_field bash scripts/gate_vs_field.sh
exec bash "$(dirname "$0")/study.sh" gate_vs_field "$@"
