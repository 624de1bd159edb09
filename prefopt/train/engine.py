"""The optimizer side of training behind one small interface: backward, step, save, load.

`TorchEngine` is the single-process path (one CPU or one GPU); trainer.optimizer picks its optimizer
(prefopt/train/optimizers.py), which DeepSpeed steps as its client optimizer too. A DeepSpeed engine for ZeRO and
multi-rank runs implements the same five methods, so the trainer never branches on the backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from prefopt.core.runfiles import DEEPSPEED_TAG, ENGINE_STATE, POLICY_DIR
from prefopt.train.checkpoint import check_trusted, safe_load
from prefopt.train.optimizers import adam_settings, build_optimizer
from prefopt.train.schedules import build_scheduler


def is_adapter_dir(directory: Path) -> bool:
    return (directory / "adapter_config.json").is_file()


def load_policy_weights(model: torch.nn.Module, location: str, local_files_only: bool = True) -> None:
    """Trained weights into `model` in place (its dtype and wrapping kept): a LoRA adapter dir's adapters (the
    model is the peft-wrapped base), else a whole HF model's weights: a checkpoint's policy/, an export, a hub id."""
    if is_adapter_dir(Path(location)):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(Path(location) / "adapter_model.safetensors"))
        return
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(
        location, dtype=next(model.parameters()).dtype, local_files_only=local_files_only
    )
    model.load_state_dict(saved.state_dict())


def policy_only(model: torch.nn.Module) -> dict:
    """save_pretrained's arguments that keep a checkpoint's policy/ the policy alone: a LoRA model that also holds a
    moving reference's adapter (reference_sync.py, saved on its own) saves PEFT's "default" adapter only."""
    adapters = getattr(model, "peft_config", None)
    return {"selected_adapters": ["default"]} if isinstance(adapters, dict) and len(adapters) > 1 else {}


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer moves: the parameters that require a gradient (with LoRA, the adapters)."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


class TorchEngine:
    def __init__(
        self, model: torch.nn.Module, trainer_cfg: DictConfig, cpu_adam: bool = False, under_deepspeed: bool = False
    ):
        self.model = model
        self.max_grad_norm = trainer_cfg.max_grad_norm
        trainable = trainable_parameters(model)
        if cpu_adam:  # ZeRO-Offload: DeepSpeed's vectorized CPU AdamW (an op compiled on first use, ~2 min)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.optimizer = DeepSpeedCPUAdam(trainable, adamw_mode=True, **adam_settings(trainer_cfg))
        else:  # trainer.optimizer (config validation refuses any but adamw with offload)
            self.optimizer = build_optimizer(trainable, trainer_cfg, under_deepspeed)
        self.scheduler = build_scheduler(
            self.optimizer, trainer_cfg
        )  # transformers' schedule (prefopt/train/schedules.py)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def skip_micro_step(self) -> None:
        """A micro batch with a non-finite loss: no backward (its step will not be applied)."""

    def step(self, poisoned: bool = False) -> tuple[float, bool]:
        """Clip, apply the update, advance the schedule: (pre-clip gradient norm, whether it was applied).

        A step with a non-finite micro-batch loss (`poisoned`) or gradient norm is not applied: the
        gradients are dropped and the optimizer and LR schedule stay where they were."""
        parameters = trainable_parameters(self.model)
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm)) if not poisoned else float("nan")
        applied = math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, applied

    def parameters_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters() if p.requires_grad)

    def save(self, directory: Path, tokenizer) -> None:
        """The policy in HF format (loadable with from_pretrained) plus optimizer and schedule state."""
        self.model.save_pretrained(directory / POLICY_DIR, safe_serialization=True, **policy_only(self.model))
        tokenizer.save_pretrained(directory / POLICY_DIR)
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            directory / ENGINE_STATE,
        )  # plain tensors and containers: loads with weights_only

    def load(self, directory: Path) -> None:
        load_policy_weights(self.model, str(directory / POLICY_DIR))
        state = safe_load(directory / ENGINE_STATE)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def offloads_optimizer(hardware_cfg: DictConfig) -> bool:
    return bool(hardware_cfg.offload_optimizer or hardware_cfg.offload_params) and hardware_cfg.engine == "deepspeed"


def deepspeed_config(cfg: DictConfig, world_size: int, for_reference: bool = False) -> dict:
    """The DeepSpeed config generated from the groups; hardware.deepspeed_config (JSON/YAML) overrides any field."""
    hardware, trainer = cfg.hardware, cfg.trainer
    stage = hardware.zero_stage
    if for_reference:
        stage = hardware.reference_zero_stage if hardware.reference_zero_stage is not None else (3 if stage == 3 else 0)
    zero: dict = {"stage": stage}
    if stage >= 2 and hardware.offload_optimizer and not for_reference:
        zero["offload_optimizer"] = {"device": "cpu"}
    if stage == 3 and (hardware.offload_params or (for_reference and cfg.reference.offload)):
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": trainer.grad_accum,
        "train_batch_size": trainer.micro_batch_size * trainer.grad_accum * world_size,
        "gradient_clipping": trainer.max_grad_norm,
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "zero_optimization": zero,
        # without offload the client optimizer is trainer.optimizer's (no op to compile); with it, DeepSpeedCPUAdam
        "zero_force_ds_cpu_optimizer": offloads_optimizer(hardware),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if hardware.deepspeed_config:
        from omegaconf import OmegaConf

        user = OmegaConf.to_container(OmegaConf.load(hardware.deepspeed_config), resolve=True)
        config = OmegaConf.to_container(OmegaConf.merge(config, user))
    return config


class DeepSpeedEngine:
    """ZeRO 0-3 (and offload) through deepspeed.initialize; the same five methods as TorchEngine."""

    def __init__(self, model: torch.nn.Module, cfg: DictConfig, world_size: int):
        import deepspeed

        # the same optimizer and schedule as one process; with the optimizer offloaded, DeepSpeed's CPU AdamW
        torch_engine = TorchEngine(model, cfg.trainer, cpu_adam=offloads_optimizer(cfg.hardware), under_deepspeed=True)
        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=torch_engine.optimizer,
            lr_scheduler=torch_engine.scheduler,
            config=deepspeed_config(cfg, world_size),
        )
        self.model = self.ds.module
        self.grad_accum = cfg.trainer.grad_accum
        self.zero_stage = cfg.hardware.zero_stage
        self.bf16 = cfg.model.dtype == "bf16"

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def backward(self, loss: torch.Tensor) -> None:
        # the trainer already divides by grad_accum; DeepSpeed counts micro steps and only updates
        # (all-reduce, clip, optimizer and LR step) at the accumulation boundary
        self.ds.backward(loss, scale_wrt_gas=False)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()

    def skip_micro_step(self) -> None:
        """A micro batch with a non-finite loss (on any rank): no backward; the micro step is still counted."""
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # not at the boundary DeepSpeed's step only counts the micro step

    def step(self, poisoned: bool = False) -> tuple[float, bool]:
        """The boundary step: (pre-clip global gradient norm, whether the update was applied).

        Not applied when a micro batch was non-finite (every rank knows: the trainer all-reduces the
        check), and at ZeRO-0 when the gradient norm is non-finite. At ZeRO 1-3 the norm is only known
        inside DeepSpeed's step, after the update; the trainer then finds the weights non-finite."""
        full_norm = self._full_grad_norm() if self.zero_stage == 0 and not poisoned else None
        if poisoned or (full_norm is not None and not math.isfinite(full_norm)):
            self.ds.zero_grad()
            self.ds.micro_steps += 1  # what ds.step() would count; optimizer, schedule and global step stay
            return (full_norm if full_norm is not None else float("nan")), False
        self.ds.step()
        grad_norm = full_norm if full_norm is not None else self.ds.get_global_grad_norm()
        return (float(grad_norm) if grad_norm is not None else float("nan")), True

    def parameters_finite(self) -> bool:
        """This rank's partition of the trainable weights is finite (the trainer reduces it over ranks)."""
        return all(
            bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in self.model.parameters() if p.requires_grad
        )

    def _full_grad_norm(self) -> float:
        norms = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0

    def save(self, directory: Path, tokenizer) -> None:
        """Every rank writes its ZeRO shards; rank 0 also exports the whole policy in HF format."""
        import torch.distributed as dist

        self.ds.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        state_dict = self.export_state_dict()  # collective under ZeRO-3: every rank takes part
        if dist.get_rank() == 0:
            self.model.save_pretrained(
                directory / POLICY_DIR, state_dict=state_dict, safe_serialization=True, **policy_only(self.model)
            )
            tokenizer.save_pretrained(directory / POLICY_DIR)

    def export_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """What the HF export holds. Under bf16 the fp32 master weights: they are the trained weights
        (the bf16 module copy is rounded, and loses exactly the small updates mixed precision keeps).
        Under ZeRO-3 the gathered weights. None = the module's own state_dict."""
        if not self.bf16:
            return self.ds._zero3_consolidated_16bit_state_dict() if self.zero_stage == 3 else None
        from deepspeed.utils import safe_get_full_fp32_param

        # ZeRO-0 keeps its masters in FP16_UnfusedOptimizer.fp32_groups, which safe_get_full_fp32_param does not read
        stage0_masters = {}
        for low, high in zip(
            getattr(self.ds.optimizer, "fp16_groups", []), getattr(self.ds.optimizer, "fp32_groups", [])
        ):
            stage0_masters |= {id(param): master for param, master in zip(low, high)}
        state = {}
        for name, param in self.model.named_parameters():
            master = stage0_masters.get(id(param))
            if master is None:
                master = safe_get_full_fp32_param(param) if param.requires_grad else None
            if master is None:  # frozen (LoRA base) weights have no master copy
                master = param.detach() if self.zero_stage < 3 else None
                if master is None:
                    from deepspeed.zero import GatheredParameters

                    with GatheredParameters([param]):
                        master = param.detach().clone()
            state[name] = master.detach().float().cpu().clone()
        persistent = self.model.state_dict().keys()
        state |= {
            name: buffer.detach().cpu().clone() for name, buffer in self.model.named_buffers() if name in persistent
        }
        return state

    def load(self, directory: Path) -> None:
        check_trusted(directory / DEEPSPEED_TAG)  # DeepSpeed's loader unpickles
        self.ds.load_checkpoint(
            str(directory), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )


def build_engine(model: torch.nn.Module, cfg: DictConfig, world_size: int):
    if cfg.hardware.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, world_size)
    return TorchEngine(model, cfg.trainer)


def wrap_reference(reference: torch.nn.Module, cfg: DictConfig, world_size: int) -> torch.nn.Module:
    """A frozen reference: under DeepSpeed an inference engine without optimizer (ZeRO-3 when the policy is)."""
    if cfg.hardware.engine != "deepspeed":
        return reference
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=reference, config=deepspeed_config(cfg, world_size, for_reference=True)
    )
    return engine.module
