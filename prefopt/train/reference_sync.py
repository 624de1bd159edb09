"""A moving reference (TR-DPO, arXiv:2404.09656; TRL's `sync_ref_model`): after every optimizer step whose number is a
multiple of `reference.sync_every` (tau), the reference takes the policy's weights, wholly (`reference.sync=hard`) or
mixed in (`soft`: ref <- alpha * policy + (1 - alpha) * ref, alpha = `reference.mixup_alpha`). The formula, its
operation order (`ref.mul_(1 - alpha).add_(policy, alpha=alpha)` over the parameters, buffers untouched) and when it
fires (after the optimizer step, on the global step) are TRL 1.16's SyncRefModelCallback.

Where the reference's weights live:
- full fine-tuning: the frozen copy of the initial policy (under DeepSpeed its inference engine's module), mixed in
  place. Every rank holds the whole policy and reference (ZeRO 0-2) and mixes identically; ZeRO-3 is refused
  (check_reference_sync), its partitioned weights would need a gathered mix that is not tested here.
- LoRA: a second adapter, "reference", beside the trained "default" one, started as a copy of it (B = 0: the base
  model, as the adapters-off reference) and run with dropout 0. A hard sync copies the adapter's factors, which makes
  the reference's merged weights equal the policy's, as TRL's sync of a merged model would. A soft sync would mix the
  factors A and B separately, and alpha * B_p A_p + (1 - alpha) * B_r A_r is not (alpha B_p + ...)(alpha A_p + ...):
  it is refused rather than approximated.

A reference that moves cannot be precomputed: `reference.precompute=auto` keeps a live reference (one log line),
`true` is refused. The reference's moving weights go into every checkpoint (REFERENCE_STATE), and a resume restores
them exactly; a checkpoint without them is refused. `prefopt eval` scores against the base model, as for any run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from prefopt.core.errors import CheckpointError, ConfigError
from prefopt.core.runfiles import REFERENCE_STATE
from prefopt.losses import loss_plan_of
from prefopt.train.checkpoint import safe_load
from prefopt.train.reference import ModelReference, frozen_copy_reference

log = logging.getLogger("prefopt")

REFERENCE_ADAPTER = "reference"  # the LoRA reference's adapter name (the policy's is PEFT's "default")
POLICY_ADAPTER = "default"


def reference_moves(cfg: DictConfig) -> bool:
    return cfg.reference.sync != "none"


def check_reference_sync(cfg: DictConfig, hardware: bool = True) -> None:
    """reference.sync's refusals (validate_config): each a one-line ConfigError naming the keys and why."""
    reference = cfg.reference
    if not 0.0 < reference.mixup_alpha <= 1.0:
        raise ConfigError(
            f"reference.mixup_alpha={reference.mixup_alpha} must be in (0, 1]: the policy's share of a soft sync"
        )
    if not reference_moves(cfg):
        return
    sync = f"reference.sync={reference.sync}"
    if reference.precompute is True:
        raise ConfigError(
            f"{sync} cannot run with reference.precompute=true: a cache of a reference that moves would be stale "
            "after its first sync; use reference.precompute=auto or false (a live reference)"
        )
    if not loss_plan_of(cfg.loss).needs_reference:
        raise ConfigError(
            f"{sync} does nothing for loss={cfg.loss.name}, which has no reference; set reference.sync=none"
        )
    if cfg.model.lora.enabled and reference.sync == "soft":
        raise ConfigError(
            "reference.sync=soft cannot run with model.lora.enabled=true: mixing the LoRA factors A and B is not "
            "mixing the weights they make (alpha*B1A1 + (1-alpha)*B2A2 is no rank-r product); use reference.sync=hard "
            "or full fine-tuning"
        )
    if hardware and cfg.hardware.engine == "deepspeed":
        stages = (cfg.hardware.zero_stage, cfg.hardware.reference_zero_stage)
        if 3 in stages:
            raise ConfigError(
                f"{sync} does not run under ZeRO-3 (hardware.zero_stage / hardware.reference_zero_stage = 3 partition "
                "the weights it mixes); use hardware.zero_stage<=2 with hardware.reference_zero_stage=null or 0"
            )


class AdapterReference(ModelReference):
    """The LoRA policy run with its "reference" adapter active (ModelReference's log-probs, unchanged)."""

    def logps(self, *args, **kwargs):
        with active_adapter(self.model, REFERENCE_ADAPTER):
            return super().logps(*args, **kwargs)


@contextlib.contextmanager
def active_adapter(model, name: str):
    """`name` active, frozen (inference_mode), for the block; then the policy's adapter, trainable, as before."""
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(POLICY_ADAPTER)


def add_reference_adapter(policy) -> None:
    """The "reference" adapter: the policy adapter's config with dropout 0 and frozen, its weights a copy of the
    policy adapter's (PEFT's init draws are made under a forked RNG, so the run's random stream is not moved)."""
    config = copy.deepcopy(policy.peft_config[POLICY_ADAPTER])
    config.lora_dropout, config.inference_mode = 0.0, True
    with torch.random.fork_rng(devices=[]):
        policy.add_adapter(REFERENCE_ADAPTER, config)
    with torch.no_grad():
        for reference_param, policy_param in adapter_pairs(policy):
            reference_param.copy_(policy_param)


def adapter_pairs(model) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(reference adapter's, policy adapter's) parameter pairs, matched by name."""
    params = dict(model.named_parameters())
    marker = f".{REFERENCE_ADAPTER}."
    pairs = [
        (param, params[name.replace(marker, f".{POLICY_ADAPTER}.")]) for name, param in params.items() if marker in name
    ]
    if not pairs:
        raise RuntimeError("the LoRA policy has no reference adapter to sync")
    return pairs


def copy_pairs(reference_model, policy) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(reference's, policy's) parameter pairs of the frozen copy, matched by name (the same module tree)."""
    policy_params = dict(policy.named_parameters())
    reference_params = dict(reference_model.named_parameters())
    if reference_params.keys() != policy_params.keys():
        raise RuntimeError("the reference copy's parameters are not the policy's: it cannot be synced")
    return [(reference_params[name], policy_params[name]) for name in policy_params]


def moving_reference(cfg: DictConfig, policy, world_size: int, is_main: bool) -> ModelReference:
    """The live reference a moving run needs, built before the engine wraps the policy (it is the initial policy)."""
    if is_main and str(cfg.reference.precompute).lower() == "auto":
        log.info(
            "reference.sync=%s: the reference moves with the policy, so reference.precompute=auto keeps a live "
            "reference model (no cache)",
            cfg.reference.sync,
        )
    if cfg.model.lora.enabled:
        add_reference_adapter(policy)
        return AdapterReference(policy, cfg.trainer.logp_chunk_size)
    return frozen_copy_reference(cfg, policy, world_size)


class ReferenceSync:
    """Syncs the reference's weights into place after the optimizer steps TRL would; counts and records them."""

    def __init__(self, reference_cfg: DictConfig, pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]]):
        self.mode, self.every, self.alpha = reference_cfg.sync, reference_cfg.sync_every, reference_cfg.mixup_alpha
        self.pairs = pairs
        self.sync_steps: list[int] = []

    @torch.no_grad()
    def after_step(self, step: int) -> bool:
        """After the optimizer step of `step` (applied or skipped, as TRL's on_step_end): sync when it is due."""
        if step % self.every:
            return False
        mix_into(self.pairs, 1.0 if self.mode == "hard" else self.alpha)
        self.sync_steps.append(step)
        return True

    def metrics(self) -> dict[str, float]:
        return {"train/reference/syncs": float(len(self.sync_steps))}

    def summary(self) -> dict[str, Any]:
        return {"reference/syncs": len(self.sync_steps), "reference/sync_steps": list(self.sync_steps)}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (REFERENCE_STATE): the reference's moving weights, in order, and the syncs so far."""
        return {
            "mode": self.mode,
            "sync_steps": list(self.sync_steps),
            "weights": [reference.detach().cpu().clone() for reference, _ in self.pairs],
        }

    def save(self, directory: Path) -> None:
        torch.save(self.state(), directory / REFERENCE_STATE)

    @torch.no_grad()
    def load(self, checkpoint: Path) -> None:
        """The reference exactly as the checkpoint's step left it; refused when the checkpoint lacks it."""
        path = checkpoint / REFERENCE_STATE
        if not path.is_file():
            raise CheckpointError(
                f"trainer.resume: checkpoint {checkpoint} holds no reference weights ({REFERENCE_STATE}), which "
                f"reference.sync={self.mode} needs to continue exactly (saved by an older prefopt?); resume from a "
                "checkpoint of this run, or start a fresh run"
            )
        state = safe_load(path)
        weights = state["weights"]
        if len(weights) != len(self.pairs) or any(w.shape != r.shape for w, (r, _) in zip(weights, self.pairs)):
            raise CheckpointError(f"trainer.resume: {path} does not hold this run's reference weights")
        for saved, (reference, _) in zip(weights, self.pairs):
            reference.copy_(saved)
        self.sync_steps = [int(step) for step in state["sync_steps"]]


def mix_into(pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]], alpha: float) -> None:
    """TRL's _sync_target_model: ref <- (1 - alpha) * ref + alpha * policy, in the reference's dtype; alpha 1 copies
    (0 * ref + policy is the policy exactly, as long as ref is finite: copy_ says so without relying on it)."""
    for reference, policy in pairs:
        if alpha == 1.0:
            reference.data.copy_(policy.data)
        else:
            reference.data.mul_(1.0 - alpha).add_(policy.data.to(reference.dtype), alpha=alpha)


def build_reference_sync(cfg: DictConfig, reference: Optional[ModelReference], policy) -> Optional[ReferenceSync]:
    """The sync of a moving reference (None when reference.sync=none); `policy` is the engine's model."""
    if not reference_moves(cfg) or reference is None:
        return None
    if isinstance(reference, AdapterReference):
        return ReferenceSync(cfg.reference, adapter_pairs(policy))
    return ReferenceSync(cfg.reference, copy_pairs(reference.model, policy))
