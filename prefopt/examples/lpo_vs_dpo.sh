#!/usr/bin/env bash
# LPO vs DPO over seeds, then `prefopt report` with confidence intervals.
#
# What it shows: a sweep (`prefopt train -m`: one job per combination, here 2 losses x 3 seeds, one after
# another in this process) and the report that compares the losses fairly: per loss the mean and 95% Student-t
# interval over seeds of the probe log-prob changes (chosen, rejected, unrelated "others", greedy path) and the
# eval reward accuracy, and LPO's paired difference to DPO seed by seed (--baseline loss=dpo). The data are
# arith pairs whose rejected answers are off-policy (a wrong number in an odd format, deep in a probability
# valley), where DPO squeezes: it pushes the rejected answers and the unrelated responses down, while LPO's
# positive term guards the chosen answers (README: "The squeezing demo").
#
#   bash examples/lpo_vs_dpo.sh                                  # SmolLM2-135M on the CPU, 6 jobs
#   bash examples/lpo_vs_dpo.sh loss=dpo,lpo,gate_dpo trainer.seed=0,1,2,3,4
#   SWEEP_DIR=sweeps/mine bash examples/lpo_vs_dpo.sh           # where the jobs and the report go
#
# Expected runtime: roughly 10-15 min on 2 idle CPU cores with SmolLM2-135M (6 jobs of 30 steps, estimated from
# the main job's 1 min 37 s; not timed), ~1 min with model=tiny_llama trainer.max_steps=2 trainer.seed=0,1.
# Look at: SWEEP_DIR/report_groups.md (printed too), report_bands.png (mean trajectories with 95% bands per
# loss), report.md (one row per job), and each job's dir SWEEP_DIR/<n>/.
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
SWEEP_DIR=${SWEEP_DIR:-outputs/examples/lpo_vs_dpo_$(date +%Y%m%d_%H%M%S)}

# trainer.lr + constant schedule after the warmup: push for the whole run (the dynamics are the point, as in the squeezing demo);
# greedy eval and final weights skipped: the probes are the measurement
"${PREFOPT[@]}" train -m loss=dpo,lpo trainer.seed=0,1,2 model=smollm2_135m \
    dataset=arith dataset.arith.rejected_style=offpolicy trainer.max_steps=30 trainer.lr=1e-5 trainer.lr_schedule=constant_with_warmup \
    trainer.greedy_eval_examples=0 trainer.save_final=false dynamics.every_n_steps=10 \
    hydra.sweep.dir="$SWEEP_DIR" "$@"
# the jobs of a group may differ only in trainer.seed; paired by seed against loss=dpo
"${PREFOPT[@]}" report "$SWEEP_DIR" --group-by loss --baseline loss=dpo
