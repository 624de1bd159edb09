#!/usr/bin/env bash
# LoRA on Llama 3.2 1B across the local GPUs with DeepSpeed ZeRO-2.
#
# What it shows: adapters only (model.lora.enabled=true: peft, rank 16 on the attention projections) on a
# 1B model, one rank per GPU through torchrun, DeepSpeed ZeRO-2 (optimizer state and gradients sharded; its
# config is generated from the groups, hardware.deepspeed_config=ds.json overrides any field), bf16 mixed
# precision (the preset's model.dtype). The reference log-probs are computed once before training
# (reference.precompute=auto), so no second model is held; with reference.precompute=false the reference is
# the same model with its adapters disabled. Checkpoints hold the adapters; `prefopt export RUN_DIR` writes
# the merged model.
#
#   bash examples/lora_zero2.sh model.path=/models/Llama-3.2-1B-Instruct     # offline: a local copy of the model
#   GPUS=4 bash examples/lora_zero2.sh model.lora.r=8 trainer.max_steps=200
#   bash examples/lora_zero2.sh model=tiny_llama hardware.device=cpu hardware.gpus_per_node=2 hardware.num_threads=1 \
#       trainer.max_steps=2           # the same command at tiny scale on the CPU: 2 ranks, ZeRO-2 on DeepSpeed's CPU accelerator
#
# Expected runtime: a few minutes on 8 GPUs (model load and the reference pass dominate at 100 steps; not
# timed here: no GPU was available); ~30-60 s at the tiny CPU scale above (DeepSpeed start-up per rank).
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
VISIBLE_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
GPUS=${GPUS:-$VISIBLE_GPUS}       # ranks: every visible GPU unless GPUS is set
[ "${GPUS:-0}" -gt 0 ] || GPUS=1  # no GPU visible: prefopt then says so (hardware.device=cuda) before loading anything
RUN_DIR=${RUN_DIR:-outputs/examples/lora_zero2_$(date +%Y%m%d_%H%M%S)}

# trainer.lr: adapters want a larger LR than full fine-tuning; micro batch 4 per GPU
"${PREFOPT[@]}" train model=llama3_2_1b model.lora.enabled=true model.lora.r=16 model.lora.alpha=32 \
    hardware=zero2 hardware.gpus_per_node="$GPUS" loss=dpo trainer.lr=5e-5 trainer.max_steps=100 \
    trainer.micro_batch_size=4 hydra.run.dir="$RUN_DIR" "$@" || {
    status=$?
    [ "${VISIBLE_GPUS:-0}" -gt 0 ] || echo "$(basename "$0"): no GPU visible here; the same recipe at tiny scale on" \
        "the CPU: bash $0 model=tiny_llama hardware.device=cpu hardware.gpus_per_node=2 hardware.num_threads=1" \
        "trainer.max_steps=2" >&2
    exit $status
}
echo "run dir: $RUN_DIR; merged model: prefopt export $RUN_DIR -o $RUN_DIR/merged"
