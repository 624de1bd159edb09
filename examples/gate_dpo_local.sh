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
# Expected runtime: about 1-2 min on 2 CPU cores with SmolLM2-135M (estimated from the main job's 1 min 37 s
# for 30 steps of 4 pairs; not timed on this file); ~15 s with model=tiny_llama trainer.max_steps=2.
# Look at: RUN_DIR/metrics.jsonl (train/gate/mean, min, frac_below_half every step: 1 = plain DPO),
# summary.json (eval reward accuracy, chosen/rejected log-prob changes), dynamics.png (probe trajectories).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFOPT=(${PREFOPT:-.venv/bin/prefopt})  # the prefopt command: PREFOPT=prefopt for an install elsewhere
DATA=${DATA:-examples/data/ultrafeedback_sample.jsonl}
RUN_DIR=${RUN_DIR:-outputs/examples/gate_dpo_local_$(date +%Y%m%d_%H%M%S)}

# dataset=ultrafeedback reads a local file of its schema (held-out pairs: dataset.eval_fraction of the rows);
# trainer.lr: a higher LR than the default job's so 20 steps on 18 pairs move the model visibly
"${PREFOPT[@]}" train loss=gate_dpo model=smollm2_135m dataset=ultrafeedback dataset.path="$DATA" \
    dataset.eval_fraction=0.25 trainer.max_steps=20 trainer.lr=1e-5 trainer.greedy_eval_examples=4 \
    hydra.run.dir="$RUN_DIR" "$@"
echo "run dir: $RUN_DIR (metrics.jsonl, summary.json, dynamics.png)"
