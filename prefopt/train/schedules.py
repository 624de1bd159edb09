"""How long a run trains and at what learning rate: transformers' own schedules, and epochs -> steps.

The schedule is built by `transformers.get_scheduler` (the same LambdaLR a Hugging Face Trainer or TRL
run gets, so an LR curve from prefopt and one from them are the same curve), from
`trainer.lr_schedule` (any name transformers accepts, except the two that step on a metric),
`trainer.warmup_steps` or `trainer.warmup_ratio`, `trainer.min_lr_ratio` and `trainer.lr_scheduler_kwargs`.
Its state is a plain LambdaLR state dict, saved and restored with the optimizer's (engine.py), and the
DeepSpeed engine is handed this same scheduler object.

The parent validates these keys without importing transformers (seconds matter there): SCHEDULES
lists each schedule's extra keyword arguments, and tests/test_resume_schedules.py checks the table
against transformers' own function signatures.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.core.fileutil import atomic_write_text

log = logging.getLogger("prefopt")

# schedule name (transformers' SchedulerType value) -> the keyword arguments its function takes beyond
# optimizer, num_warmup_steps, num_training_steps and last_epoch
SCHEDULES: dict[str, tuple[str, ...]] = {
    "linear": (),
    "cosine": ("num_cycles",),
    "cosine_with_restarts": ("num_cycles",),
    "polynomial": ("lr_end", "power"),
    "constant": (),
    "constant_with_warmup": (),
    "inverse_sqrt": ("timescale",),
    "cosine_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate"),
    "cosine_warmup_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate"),
    "warmup_stable_decay": (
        "num_decay_steps",
        "num_stable_steps",
        "warmup_type",
        "decay_type",
        "min_lr_ratio",
        "num_cycles",
    ),
}
# transformers' schedules that need a metric each step (prefopt steps its schedule once per optimizer step)
METRIC_SCHEDULES = ("reduce_lr_on_plateau", "greedy")
# schedules with a floor: trainer.min_lr_ratio becomes this keyword (polynomial's lr_end is absolute: ratio x lr)
MIN_LR_KWARG = {
    "cosine_with_min_lr": "min_lr_rate",
    "cosine_warmup_with_min_lr": "min_lr_rate",
    "warmup_stable_decay": "min_lr_ratio",
    "polynomial": "lr_end",
}
MIN_LR_REQUIRED = ("cosine_with_min_lr", "cosine_warmup_with_min_lr")  # transformers refuses them without a floor
POLYNOMIAL_DEFAULT_LR_END = 1e-7  # transformers' default for polynomial's lr_end


def warmup_steps(trainer_cfg: DictConfig) -> int:
    """trainer.warmup_steps, or ceil(trainer.warmup_ratio x max_steps) as a Hugging Face Trainer rounds it."""
    if trainer_cfg.get("warmup_ratio") is not None:
        return math.ceil(trainer_cfg.warmup_ratio * trainer_cfg.max_steps)
    return trainer_cfg.warmup_steps or 0


def scheduler_kwargs(trainer_cfg: DictConfig) -> dict[str, Any]:
    """The schedule's extra keyword arguments: trainer.lr_scheduler_kwargs plus trainer.min_lr_ratio in
    the form this schedule takes it."""
    kwargs = (
        dict(OmegaConf.to_container(trainer_cfg.lr_scheduler_kwargs, resolve=True))
        if trainer_cfg.get("lr_scheduler_kwargs")
        else {}
    )
    ratio = trainer_cfg.get("min_lr_ratio")
    if ratio is not None:
        name = MIN_LR_KWARG[trainer_cfg.lr_schedule]
        kwargs[name] = ratio * trainer_cfg.lr if name == "lr_end" else ratio
    return kwargs


def build_scheduler(optimizer, trainer_cfg: DictConfig):
    """transformers' scheduler for this config (a LambdaLR; its state_dict is plain numbers)."""
    from transformers import get_scheduler

    return get_scheduler(
        trainer_cfg.lr_schedule,
        optimizer,
        num_warmup_steps=warmup_steps(trainer_cfg),
        num_training_steps=trainer_cfg.max_steps,
        scheduler_specific_kwargs=scheduler_kwargs(trainer_cfg),
    )


def check_schedule_config(trainer_cfg: DictConfig) -> None:
    """Every way the schedule keys can disagree, named before any model loads."""
    name = trainer_cfg.lr_schedule
    if name in METRIC_SCHEDULES:
        raise ConfigError(
            f"trainer.lr_schedule={name} steps on a metric, and prefopt steps its schedule once per optimizer "
            f"step; use one of: {', '.join(SCHEDULES)}"
        )
    if name not in SCHEDULES:
        raise ConfigError(
            f"trainer.lr_schedule={name!r} is not a valid choice; use one of: {', '.join(SCHEDULES)} "
            f"(transformers' schedule names)"
        )
    if trainer_cfg.warmup_steps is not None and trainer_cfg.warmup_ratio is not None:
        raise ConfigError(
            f"trainer.warmup_steps={trainer_cfg.warmup_steps} and trainer.warmup_ratio={trainer_cfg.warmup_ratio} "
            f"are both set: keep one (add trainer.warmup_steps=null to warm up by ratio)"
        )
    if trainer_cfg.warmup_ratio is not None and not 0.0 <= trainer_cfg.warmup_ratio <= 1.0:
        raise ConfigError(
            f"trainer.warmup_ratio={trainer_cfg.warmup_ratio} must be in [0, 1]: a share of the training steps"
        )
    if name == "constant" and (trainer_cfg.warmup_steps or trainer_cfg.warmup_ratio):
        warmup = (
            f"trainer.warmup_steps={trainer_cfg.warmup_steps}"
            if trainer_cfg.warmup_steps
            else f"trainer.warmup_ratio={trainer_cfg.warmup_ratio}"
        )
        raise ConfigError(
            f"trainer.lr_schedule=constant has no warmup, but {warmup}: use trainer.lr_schedule=constant_with_warmup, "
            f"or set the warmup to 0"
        )
    kwargs = (
        OmegaConf.to_container(trainer_cfg.lr_scheduler_kwargs, resolve=True) if trainer_cfg.lr_scheduler_kwargs else {}
    )
    unknown = sorted(set(kwargs) - set(SCHEDULES[name]))
    if unknown:
        accepted = ", ".join(SCHEDULES[name]) or "none"
        raise ConfigError(
            f"trainer.lr_scheduler_kwargs.{unknown[0]} is not an argument of the {name} schedule (it takes: {accepted})"
        )
    ratio = trainer_cfg.min_lr_ratio
    if ratio is not None:
        if name not in MIN_LR_KWARG:
            raise ConfigError(
                f"trainer.min_lr_ratio={ratio} is not used by trainer.lr_schedule={name}; the schedules with a floor "
                f"are {', '.join(MIN_LR_KWARG)} (cosine to a floor: cosine_with_min_lr)"
            )
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"trainer.min_lr_ratio={ratio} must be in [0, 1): the lowest LR as a share of trainer.lr")
        clashing = [key for key in ("min_lr", "min_lr_rate", "min_lr_ratio", "lr_end") if key in kwargs]
        if clashing:
            raise ConfigError(
                f"trainer.min_lr_ratio and trainer.lr_scheduler_kwargs.{clashing[0]} both set the floor: keep one"
            )
    if name in MIN_LR_REQUIRED and ratio is None and not ({"min_lr", "min_lr_rate"} & set(kwargs)):
        raise ConfigError(
            f"trainer.lr_schedule={name} decays to a floor: set trainer.min_lr_ratio (e.g. 0.1 = a tenth of trainer.lr)"
        )
    if name in MIN_LR_REQUIRED and {"min_lr", "min_lr_rate"} <= set(kwargs):
        raise ConfigError("trainer.lr_scheduler_kwargs: min_lr and min_lr_rate both set the floor: keep one")
    if name == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        raise ConfigError(
            "trainer.lr_schedule=warmup_stable_decay needs trainer.lr_scheduler_kwargs.num_decay_steps "
            "(e.g. +trainer.lr_scheduler_kwargs.num_decay_steps=10)"
        )
    if name == "polynomial":
        lr_end = ratio * trainer_cfg.lr if ratio is not None else kwargs.get("lr_end", POLYNOMIAL_DEFAULT_LR_END)
        if not trainer_cfg.lr > lr_end:
            raise ConfigError(
                f"trainer.lr_schedule=polynomial decays from trainer.lr={trainer_cfg.lr} to lr_end={lr_end:g}, which "
                f"must be lower: set trainer.min_lr_ratio (or trainer.lr_scheduler_kwargs.lr_end)"
            )


def check_length_config(trainer_cfg: DictConfig) -> None:
    """Exactly one of trainer.max_steps and trainer.num_epochs says how long the run trains."""
    if trainer_cfg.max_steps is not None and trainer_cfg.num_epochs is not None:
        raise ConfigError(
            f"trainer.max_steps={trainer_cfg.max_steps} and trainer.num_epochs={trainer_cfg.num_epochs} are both set: "
            f"keep one (add trainer.max_steps=null to train by epochs)"
        )
    if trainer_cfg.max_steps is None and trainer_cfg.num_epochs is None:
        raise ConfigError(
            "trainer.max_steps and trainer.num_epochs are both null: set one (trainer.max_steps=N or "
            "trainer.num_epochs=E)"
        )
    if trainer_cfg.num_epochs is not None and not trainer_cfg.num_epochs > 0:
        raise ConfigError(f"trainer.num_epochs={trainer_cfg.num_epochs} is impossible: it must be > 0")


def epoch_steps(num_epochs: float, num_pairs: int, micro_batch_size: int, grad_accum: int, world_size: int) -> int:
    """Optimizer steps for num_epochs passes over num_pairs training pairs, each step drawing
    micro_batch_size x grad_accum x world_size pairs: rounded up, so every pair of the last epoch is
    drawn (the sampler starts the next epoch's shuffled order inside the last step when it does not divide)."""
    pairs_per_step = micro_batch_size * grad_accum * world_size
    return max(1, math.ceil(num_epochs * num_pairs / pairs_per_step - 1e-9))


def describe_epochs(trainer_cfg: DictConfig, num_pairs: int, world_size: int) -> str:
    """One log line: how trainer.num_epochs became trainer.max_steps (once it has)."""
    return (
        f"trainer.num_epochs={trainer_cfg.num_epochs:g}: {num_pairs} training pairs / ({trainer_cfg.micro_batch_size} "
        f"micro batch x {trainer_cfg.grad_accum} accumulation x {world_size} ranks) -> "
        f"trainer.max_steps={trainer_cfg.max_steps}"
    )


def settle_max_steps(cfg: DictConfig, num_pairs: int, world_size: int, config_path: Optional[Path]) -> None:
    """trainer.num_epochs -> trainer.max_steps once the train split's size is known (the worker, after
    the data is built), in cfg and, from rank 0 (config_path), in the run dir's config.yaml: the run
    config records the steps it trained for. Every rank derives the same number."""
    trainer_cfg = cfg.trainer
    if trainer_cfg.num_epochs is None:
        return
    trainer_cfg.max_steps = epoch_steps(
        trainer_cfg.num_epochs, num_pairs, trainer_cfg.micro_batch_size, trainer_cfg.grad_accum, world_size
    )
    log.info("%s", describe_epochs(trainer_cfg, num_pairs, world_size))
    if config_path is not None:
        recorded = OmegaConf.load(config_path)
        recorded.trainer.max_steps = trainer_cfg.max_steps
        atomic_write_text(config_path, OmegaConf.to_yaml(recorded))
