#!/usr/bin/env bash
# Evaluate a trained run's checkpoint against its base model.
#
# What it shows: `prefopt eval` on a run dir: its newest valid checkpoint, with the run's own config (the same
# eval pairs, probes, loss and reference), the base model evaluated first as step 0 (eval.baseline=true), into
# a run dir of its own with what a training run leaves (metrics.jsonl, summary.json with eval/delta/* and greedy
# accuracy before/after, dynamics.jsonl, dynamics.png), so `prefopt plot` and `prefopt report` read it. Its final
# numbers reproduce the run's own final eval; any group or key given after the run dir replaces the run's, e.g.
# other held-out data.
#
#   bash examples/gate_dpo_local.sh && bash examples/eval_checkpoint.sh outputs/examples/gate_dpo_local_<time>
#   bash examples/eval_checkpoint.sh RUN_DIR/checkpoints/step-000010                       # one checkpoint
#   bash examples/eval_checkpoint.sh RUN_DIR dataset=local dataset.path=heldout.jsonl      # other data
#   bash examples/eval_checkpoint.sh RUN_DIR eval.baseline=false                           # the policy only (half the cost)
#
# Expected runtime: under a minute on 2 CPU cores for a SmolLM2-135M run of examples/gate_dpo_local.sh (two
# evals of 6 pairs, probes and 4 greedy answers each; estimated, not timed); ~15 s for a model=tiny_llama run.
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
if [ $# -lt 1 ] || [[ $1 == *=* ]]; then
    echo "usage: bash $0 RUN_DIR_OR_CHECKPOINT [hydra overrides]  (e.g. a run dir of gate_dpo_local.sh:" \
        "outputs/examples/gate_dpo_local_<time>)" >&2
    exit 2
fi
RUN=$1
shift
EVAL_DIR=${EVAL_DIR:-outputs/examples/eval_$(basename "$RUN")_$(date +%Y%m%d_%H%M%S)}

"${PREFOPT[@]}" eval "$RUN" eval.baseline=true hydra.run.dir="$EVAL_DIR" "$@"
# a run dir (not a single checkpoint): its probe trajectories and the eval's two points (base, policy) in one figure
if [ -f "$RUN/dynamics.jsonl" ]; then
    "${PREFOPT[@]}" plot "$RUN" "$EVAL_DIR" -o "$EVAL_DIR/run_and_eval.png"
fi
