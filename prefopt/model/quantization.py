"""bitsandbytes for the two things prefopt uses it for: QLoRA's quantized frozen base (`model.quantization`) and the
8-bit AdamW (`trainer.optimizer=adamw_8bit`).

bitsandbytes is optional (`pip install 'prefopt[qlora]'`: ~125 MB, mostly CUDA kernels), so each use is checked in
the parent before anything loads and refused in one line where it cannot run. Since 0.50 (the version tried here) it
runs both on the CPU as well as on CUDA GPUs; older releases need a GPU.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Optional

from omegaconf import DictConfig

from prefopt.core.errors import ConfigError

QUANTIZATIONS = ("4bit", "8bit")  # model.quantization: NF4 (QLoRA's) or int8 (LLM.int8()) base weights
CPU_SINCE = (0, 50)  # the first bitsandbytes tried to run 4-bit, 8-bit layers and AdamW8bit on the CPU here
INSTALL = "pip install 'prefopt[qlora]' (bitsandbytes)"

# Once installed, bitsandbytes (>= 0.50) is imported by the libraries around it in every run, quantized or not, and on
# the CPU it warns at import that the hub's 4-bit CPU kernel could not be loaded (offline, or a publisher it does not
# trust); it then runs its own torch kernel, the one tests/test_own_model.py trains QLoRA with. That warning tells a
# run nothing, so only errors of that module are shown.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def bitsandbytes_version() -> Optional[tuple[int, ...]]:
    """The installed bitsandbytes's (major, minor), or None when it is not installed (nothing imported)."""
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def require_bitsandbytes(setting: str, device: Optional[str]) -> None:
    """Refuse `setting` (e.g. model.quantization=4bit) in one line where bitsandbytes cannot run it: not installed, or
    a release without CPU support on a CPU run (device None: the machine is not known, as in `prefopt data`)."""
    version = bitsandbytes_version()
    if version is None:
        raise ConfigError(f"{setting} needs bitsandbytes, which is not installed; install it: {INSTALL}")
    if device == "cpu" and version < CPU_SINCE:
        found = ".".join(map(str, version))
        raise ConfigError(
            f"{setting}: bitsandbytes {found} runs only on a CUDA GPU and this run is on the CPU; upgrade it to "
            f">= {'.'.join(map(str, CPU_SINCE))} (pip install -U bitsandbytes) or use hardware=gpu"
        )


def check_quantization_config(model_cfg: DictConfig, hardware_cfg: Optional[DictConfig]) -> None:
    """model.quantization: LoRA on top (quantized weights do not train), loaded from files (not the random tiny model),
    one process (not DeepSpeed's partitioned weights), and a bitsandbytes that runs here."""
    quantization = model_cfg.quantization
    if quantization is None:
        return
    setting = f"model.quantization={quantization}"
    if not model_cfg.lora.enabled:
        raise ConfigError(
            f"{setting} freezes the base weights in {quantization}: it trains LoRA adapters only; set "
            "model.lora.enabled=true (QLoRA) or model.quantization=null"
        )
    if model_cfg.source == "tiny":
        raise ConfigError(
            f"{setting} quantizes weights loaded from a directory; model={model_cfg.name} is built in code "
            "(source=tiny): use model=hf model.path=DIR"
        )
    if hardware_cfg is not None and hardware_cfg.engine == "deepspeed":
        raise ConfigError(
            f"{setting} runs on the torch engine (one process: hardware=cpu or hardware=gpu), not "
            f"hardware.engine=deepspeed (ZeRO partitions the weights bitsandbytes packs)"
        )
    require_bitsandbytes(setting, hardware_cfg.device if hardware_cfg is not None else None)


def quantization_config(model_cfg: DictConfig):
    """transformers' BitsAndBytesConfig for model.quantization: QLoRA's NF4 with double quantization (4bit), or
    LLM.int8() (8bit); the 4-bit layers compute in model.dtype."""
    import torch
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if model_cfg.dtype == "bf16" else torch.float32,
    )


def prepare_quantized(model):
    """PEFT's preparation of a quantized model for adapter training: every weight frozen, the layers bitsandbytes
    left unquantized (norms, embeddings, head) in fp32. Gradient checkpointing stays as load_model set it."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def parameter_count(parameter) -> int:
    """Elements of a parameter as the model defines it: a 4-bit one is stored packed (two values a byte), its
    quant_state keeps the real shape."""
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(quant_state.shape.numel())
    return parameter.numel()
