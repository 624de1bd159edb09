"""The optimizer side of training behind one small interface: backward, step, save, load.

`TorchEngine` is the single-process path (one CPU or one GPU). A DeepSpeed engine for ZeRO and
multi-rank runs implements the same five methods, so the trainer never branches on the backend.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Linear warmup to 1, then cosine / linear decay to 0 at max_steps, or constant."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class TorchEngine:
    ENGINE_STATE = "engine_state.pt"

    def __init__(self, model: torch.nn.Module, trainer_cfg: DictConfig):
        self.model = model
        self.max_grad_norm = trainer_cfg.max_grad_norm
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=trainer_cfg.lr, betas=tuple(trainer_cfg.adam_betas), weight_decay=trainer_cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_multiplier(step, trainer_cfg.warmup_steps, trainer_cfg.max_steps, trainer_cfg.lr_schedule),
        )

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, apply the update, advance the schedule; returns the pre-clip gradient norm."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def save(self, directory: Path, tokenizer) -> None:
        """The policy in HF format (loadable with from_pretrained) plus optimizer and schedule state."""
        self.model.save_pretrained(directory / "policy", safe_serialization=True)
        tokenizer.save_pretrained(directory / "policy")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, directory / self.ENGINE_STATE)

    def load(self, directory: Path) -> None:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(directory / "policy", dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(saved.state_dict())
        state = torch.load(directory / self.ENGINE_STATE, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
