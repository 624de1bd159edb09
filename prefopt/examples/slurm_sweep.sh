#!/usr/bin/env bash
# A sweep on SLURM: every job its own SLURM job (one array element), then the report.
#
# What it shows: the same sweep as on a workstation, sent to a cluster with hydra/launcher=slurm (submitit):
# 3 losses x 2 seeds = 6 array elements, one GPU each (hardware=slurm_1gpu), waited on with one `sacct` call
# per poll; a job that fails leaves its traceback in its run dir (error.txt) and `prefopt report` marks it
# failed; at the time limit a job checkpoints, requeues itself and resumes (trainer.save_every). Submit from a
# login node; the SLURM jobs run the same Python environment (hydra.launcher.setup: lines to activate it).
#
#   bash examples/slurm_sweep.sh hydra.launcher.partition=gpu hydra.launcher.account=myproj
#   bash examples/slurm_sweep.sh hardware=slurm_8gpu model=llama3_8b model.path=/models/llama3-8b hydra.launcher.timeout_min=600
#   bash scripts/slurm/start_local_cluster.sh && source .cache/slurm/env.sh     # a one-node CPU cluster on this machine:
#   bash examples/slurm_sweep.sh hydra/launcher=slurm_local hardware=cpu model=tiny_llama trainer.max_steps=2
#
# Expected runtime: queue wait plus one job's time (the jobs run in parallel, hydra.launcher.array_parallelism
# at once): ~2 min per job on a GPU for SmolLM2-135M (estimated); ~30 s on the local CPU cluster at tiny scale.
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
SWEEP_DIR=${SWEEP_DIR:-outputs/examples/slurm_sweep_$(date +%Y%m%d_%H%M%S)}  # on a file system the nodes share

# a cluster must answer before anything is composed or submitted (sbatch alone, installed without one, fails late)
if ! answer=$(timeout 20 sinfo -h -o %T 2>&1) || [ -z "$answer" ]; then
    echo "$(basename "$0"): no SLURM cluster answers here (sinfo: ${answer##*$'\n'}): run it on a cluster's login node" \
        "(SLURM_CONF set), or in a clone start a one-node CPU cluster first:" \
        "bash scripts/slurm/start_local_cluster.sh && source .cache/slurm/env.sh" >&2
    exit 2
fi

# logger.console=plain: SLURM logs get one line per step, not a redrawn progress line
"${PREFOPT[@]}" train -m hydra/launcher=slurm hardware=slurm_1gpu loss=dpo,gate_dpo,lpo trainer.seed=0,1 \
    model=smollm2_135m trainer.save_every=10 hydra.launcher.timeout_min=60 logger.console=plain \
    hydra.sweep.dir="$SWEEP_DIR" "$@"
"${PREFOPT[@]}" report "$SWEEP_DIR" --group-by loss --baseline loss=dpo
