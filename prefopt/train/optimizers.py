"""trainer.optimizer: the optimizer both engines step (TorchEngine builds it; DeepSpeed takes it as its client
optimizer), one function per choice.

- adamw: torch's AdamW (fused on one process; DeepSpeedCPUAdam when ZeRO offloads the optimizer), today's default.
- adamw_8bit: bitsandbytes' AdamW8bit, m and v kept in 8 bits (2 B per parameter instead of 8).
- adafactor: transformers' Adafactor with a fixed learning rate (relative_step=False, scale_parameter=False,
  warmup_init=False), so trainer.lr and the schedule mean what they mean for AdamW; its second moment is factored
  into row and column statistics (no per-parameter state for matrices).
- sgd: torch's SGD with trainer.momentum (0 = plain: p <- p - lr * grad).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from omegaconf import DictConfig

from prefopt.core.errors import ConfigError
from prefopt.model.quantization import require_bitsandbytes

OPTIMIZERS = ("adamw", "adamw_8bit", "adafactor", "sgd")
LABELS = {"adamw": "AdamW", "adamw_8bit": "AdamW 8-bit", "adafactor": "Adafactor", "sgd": "SGD"}  # model card


def adamw(parameters, trainer_cfg: DictConfig, fused: bool) -> torch.optim.Optimizer:
    # torch's fused AdamW kernel: on 2 CPU cores 0.08 s per step for SmolLM2-135M against 0.37 s for the default
    # per-tensor loop (a sixth of the main job's step). DeepSpeed flattens and partitions the parameters behind its
    # client optimizer, so under DeepSpeed the default implementation stays (fused=False).
    return torch.optim.AdamW(parameters, fused=fused, **adam_settings(trainer_cfg))


def adamw_8bit(parameters, trainer_cfg: DictConfig, fused: bool) -> torch.optim.Optimizer:
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(parameters, **adam_settings(trainer_cfg))


def adafactor(parameters, trainer_cfg: DictConfig, fused: bool) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    return Adafactor(
        parameters,
        lr=trainer_cfg.lr,
        weight_decay=trainer_cfg.weight_decay,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
    )


def sgd(parameters, trainer_cfg: DictConfig, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        parameters, lr=trainer_cfg.lr, momentum=trainer_cfg.momentum, weight_decay=trainer_cfg.weight_decay
    )


BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": adamw,
    "adamw_8bit": adamw_8bit,
    "adafactor": adafactor,
    "sgd": sgd,
}


def adam_settings(trainer_cfg: DictConfig) -> dict:
    return dict(lr=trainer_cfg.lr, betas=tuple(trainer_cfg.adam_betas), weight_decay=trainer_cfg.weight_decay)


def build_optimizer(parameters: list, trainer_cfg: DictConfig, under_deepspeed: bool = False) -> torch.optim.Optimizer:
    """trainer.optimizer over `parameters` (the trainable ones)."""
    return BUILDERS[trainer_cfg.optimizer](parameters, trainer_cfg, fused=not under_deepspeed)


def check_optimizer_config(trainer_cfg: DictConfig, hardware_cfg: Optional[DictConfig]) -> None:
    """trainer.optimizer (its name is checked with the other choices in run/config.py): a momentum only SGD reads,
    ZeRO-Offload's CPU optimizer is AdamW's, and bitsandbytes where adamw_8bit needs it."""
    optimizer = trainer_cfg.optimizer
    if trainer_cfg.momentum and optimizer != "sgd":
        raise ConfigError(
            f"trainer.momentum={trainer_cfg.momentum} is SGD's; trainer.optimizer={optimizer} does not read it (set "
            "trainer.optimizer=sgd or trainer.momentum=0)"
        )
    if hardware_cfg is None:
        return
    offloads = hardware_cfg.engine == "deepspeed" and (hardware_cfg.offload_optimizer or hardware_cfg.offload_params)
    if offloads and optimizer != "adamw":
        raise ConfigError(
            f"trainer.optimizer={optimizer} does not run with ZeRO-Offload (hardware.offload_optimizer / "
            "offload_params step DeepSpeed's CPU AdamW); use trainer.optimizer=adamw or a preset without offload "
            "(hardware=zero2 | zero3)"
        )
    if optimizer == "adamw_8bit":
        require_bitsandbytes("trainer.optimizer=adamw_8bit", hardware_cfg.device)
