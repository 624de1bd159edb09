"""The build step of a worker job: the policy as a run starts it (training, and `prefopt eval`)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from prefopt.model.loading import ModelSource, apply_lora, load_model
from prefopt.model.logps import check_logits_path, check_packed_path
from prefopt.model.precision import set_compute_dtype


def build_policy(cfg: DictConfig, source: ModelSource, tokenizer, device: torch.device):
    """The policy as a run starts it (training, and `prefopt eval` before it loads the trained weights): the base
    model with fp32 master weights, its compute dtype, its log-prob paths checked, LoRA adapters when enabled."""
    policy = load_model(cfg.model, source, len(tokenizer), cfg.trainer.seed).to(device)
    set_compute_dtype(policy, cfg.model.dtype, cfg.hardware.engine)  # bf16: fp32 master weights, bf16 compute
    check_logits_path(policy, len(tokenizer), device)  # the log-probs are the model's own (soft-capping, scaling)
    if cfg.trainer.batching == "packed":
        check_packed_path(policy, len(tokenizer), device)  # its attention takes prefix-shared, packed masks
    if cfg.model.lora.enabled:
        policy = apply_lora(policy, cfg.model.lora)
    return policy
