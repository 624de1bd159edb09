#!/usr/bin/env bash
# Gate-DPO on your own preference file, in UltraFeedback's layout.
#
# What it shows: training on a local JSON-lines file in the schema of UltraFeedback binarized (one object per
# line: `prompt`, and `chosen` / `rejected` as message lists that end with the assistant turn; other columns
# such as `score_chosen` are ignored), rendered with the model's chat template, with Gate-DPO: DPO whose
# gradient through the rejected log-probs is scaled per example by g = sigmoid(alpha * (p - tau)), so a
# rejected response already deep in a probability valley is not pushed further down (the squeezing effect).
# The shipped sample, examples/data/ultrafeedback_sample.jsonl, has 24 pairs; point DATA at your own file.
#
#   bash examples/gate_dpo_local.sh                                   # SmolLM2-135M (offline) on the CPU
#   DATA=train_prefs.jsonl bash examples/gate_dpo_local.sh model=qwen2_5_0_5b model.path=/models/qwen2.5-0.5b
#   bash examples/gate_dpo_local.sh loss.gate.tau=0.01 loss.gate.kind=q10   # any extra Hydra overrides win
#
# Expected runtime: about 1 min on 2 CPU cores with SmolLM2-135M (50 s wall for the 20 steps, 1.36 s/step, peak RSS
# 3.4 GB: scripts/bench_estimate.py on a quiet machine); ~15 s with model=tiny_llama trainer.max_steps=2.
# Look at: RUN_DIR/metrics.jsonl (train/gate/mean, min, frac_below_half every step: 1 = plain DPO),
# summary.json (eval reward accuracy, chosen/rejected log-prob changes), dynamics.png (probe trajectories).
set -euo pipefail
# ---- where this script lies and which prefopt runs it (the same block in every example) ----
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)  # its data/ lies beside it: in a clone, an install or a copy
CHECKOUT=${HERE%/prefopt/examples}                     # a clone's root when the script is the clone's own
if [ -n "${PREFOPT:-}" ]; then PREFOPT=($PREFOPT)       # a command of your own, e.g. PREFOPT="python -m prefopt.cli"
elif command -v prefopt >/dev/null; then PREFOPT=(prefopt)  # the one on PATH: an activated environment
elif [ -f "$CHECKOUT/pyproject.toml" ] && [ -x "$CHECKOUT/.venv/bin/prefopt" ]; then
    PREFOPT=("$CHECKOUT/.venv/bin/prefopt")            # a clone's environment (bash scripts/install.sh made it)
else
    echo "$(basename "$0"): no prefopt command: activate the environment prefopt is installed in, or set PREFOPT" >&2
    exit 127
fi
# ---- run dirs go under the directory you call it from (./outputs/examples/...) ----
DATA=${DATA:-$HERE/data/ultrafeedback_sample.jsonl}  # a relative DATA= is read from where you call it
RUN_DIR=${RUN_DIR:-outputs/examples/gate_dpo_local_$(date +%Y%m%d_%H%M%S)}

# dataset=ultrafeedback reads a local file of its schema (held-out pairs: dataset.eval_fraction of the rows);
# trainer.lr: a higher LR than the default job's so 20 steps on 18 pairs move the model visibly
"${PREFOPT[@]}" train loss=gate_dpo model=smollm2_135m dataset=ultrafeedback dataset.path="$DATA" \
    dataset.eval_fraction=0.25 trainer.max_steps=20 trainer.lr=1e-5 trainer.greedy_eval_examples=4 \
    hydra.run.dir="$RUN_DIR" "$@"
echo "run dir: $RUN_DIR (metrics.jsonl, summary.json, dynamics.png)"
