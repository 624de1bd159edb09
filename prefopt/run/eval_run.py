"""`prefopt eval`: evaluate a trained policy (or any model) exactly as a training run evaluates, into a run dir
of its own that `prefopt plot` and `prefopt report` read like a training run's.

    prefopt eval RUN_DIR                                   # the run's newest valid checkpoint, with the run's config
    prefopt eval RUN_DIR/checkpoints/step-000010           # one checkpoint, with the config it was trained with
    prefopt eval DIR model=qwen2_5_0_5b model.path=BASE dataset=arith loss=dpo   # an HF model dir or hub id
    prefopt eval -m eval.policy=RUN_A,RUN_B                # a sweep of evals: `prefopt report` tabulates it

(`prefopt eval X` is short for `prefopt eval eval.policy=X`.) The reference is the base model, as in training:
for a run, the run's model; for a model dir or hub id, `model=` (with model.path). With eval.baseline=true
the base model is evaluated first (step 0), so the run dir holds what a training run's does: metrics.jsonl
(eval/* at step 0 and at the policy's step), dynamics.jsonl (the probe set at both), summary.json (the
final eval, eval/delta/*, greedy accuracy before/after, delta/*).

Which config: for a run dir or checkpoint, the checkpoint's own groups in RUN_GROUPS (same eval pairs,
probes, loss and eval settings as the run), with every key or group given on the command line taking
its place; hardware, logger, sweep and eval are this command's (where and how it runs now).
"""

from __future__ import annotations

import copy
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.core.runfiles import CONFIG_FILE
from prefopt.recipes.evaluate import checkpoint_of, policy_source
from prefopt.run.launch import prepare_run
from prefopt.run.worker import load_frozen_config
from prefopt.train.engine import is_adapter_dir

# the groups an eval of a run takes from the run's checkpoint: what was trained and how it was evaluated
RUN_GROUPS = ("loss", "model", "dataset", "trainer", "reference", "dynamics")
# where and how this eval (or inspection) runs: never the run's
THIS_COMMAND_GROUPS = ("hardware", "logger", "sweep", "eval", "inspect", "hydra")


def take_run_config(cfg: DictConfig, checkpoint: Path, overrides: list[str], policy_key: str = "eval.policy") -> None:
    """In place: cfg's RUN_GROUPS become the checkpoint's, then every key or group named in `overrides`
    gets its command-line value back (Hydra composed it into cfg already); `policy_key` then names the checkpoint."""
    composed = copy.deepcopy(cfg)
    saved = load_frozen_config(checkpoint / CONFIG_FILE)
    for group in RUN_GROUPS:
        cfg[group] = saved[group]
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group.replace("/", ".")
        if key.split(".")[0] in THIS_COMMAND_GROUPS:
            continue  # composed into cfg already, and not taken from the run
        if key.split(".")[0] not in RUN_GROUPS or override.is_delete():
            raise ConfigError(
                f"{override.input_line}: evaluating a run (its config is the base), give groups or keys of "
                f"{', '.join(RUN_GROUPS + THIS_COMMAND_GROUPS[:-1])} one by one (key=value or group=option)"
            )
        OmegaConf.update(cfg, key, OmegaConf.select(composed, key), merge=False)
    cfg.trainer.resume, cfg.trainer.stop_after = False, None  # an eval never continues the run
    if cfg.trainer.num_epochs is not None and cfg.trainer.max_steps is not None:
        cfg.trainer.num_epochs = None  # the run derived max_steps from its epochs (with its own world size): keep that
    OmegaConf.update(cfg, policy_key, str(checkpoint.resolve()))  # the frozen config names the exact checkpoint used


def prepare_eval(cfg: DictConfig, hydra_dir: Path, overrides: list[str]) -> Path:
    """Parent side: settle which policy and config, check the models can be found, freeze the eval's run dir
    (launch.prepare_run: validation, run dir lock, config.yaml). cfg is updated in place; returns the run dir."""
    if cfg.eval.policy:
        checkpoint = checkpoint_of(str(cfg.eval.policy))
        if checkpoint is not None:
            take_run_config(cfg, checkpoint, overrides)
        else:
            source = policy_source(cfg)
            if (
                source is not None
                and source.kind == "dir"
                and is_adapter_dir(Path(source.location))
                and not cfg.model.lora.enabled
            ):
                raise ConfigError(
                    f"eval.policy={cfg.eval.policy} holds LoRA adapters: set model.lora.enabled=true (with the "
                    f"adapters' model.lora.* settings) and model= their base model"
                )
    return prepare_here(cfg, hydra_dir, overrides, "eval")


def prepare_here(cfg: DictConfig, hydra_dir: Path, overrides: list[str], command: str) -> Path:
    """A job that runs where it is started (eval, inspect): refuse a SLURM preset, never resume, freeze its run dir."""
    if OmegaConf.select(cfg, "hardware.launcher") == "slurm":
        raise ConfigError(
            f"hardware={cfg.hardware.name} (launcher: slurm): prefopt {command} runs where it is started; use a local "
            f"preset (hardware=cpu, gpu or cpu_2proc), e.g. inside an salloc/srun allocation"
        )
    cfg.trainer.resume = False
    return prepare_run(cfg, hydra_dir, overrides)


def prepare_inspect(cfg: DictConfig, hydra_dir: Path, overrides: list[str]) -> Path:
    """`prefopt inspect`'s parent side: with inspect.policy, the run's checkpoint and its config (as `prefopt eval`
    takes them); then freeze the run dir. Returns the run dir."""
    if cfg.inspect.policy:
        checkpoint = checkpoint_of(str(cfg.inspect.policy), key="inspect.policy")
        if checkpoint is None:
            raise ConfigError(
                f"inspect.policy={cfg.inspect.policy}: give a run dir or a checkpoint dir (RUN_DIR/checkpoints/"
                "step-N) of a prefopt run: its policy is scored on the pairs it trained on"
            )
        take_run_config(cfg, checkpoint, overrides, policy_key="inspect.policy")
    return prepare_here(cfg, hydra_dir, overrides, "inspect")
