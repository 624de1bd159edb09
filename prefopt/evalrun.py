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
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from prefopt.checkpoint import CHECKPOINT_CONFIG, checkpoint_candidates, find_checkpoint, load_trainer_state
from prefopt.engine import is_adapter_dir
from prefopt.errors import ConfigError, ModelNotFoundError
from prefopt.models import ModelSource, names_local_path, resolve_model_source

log = logging.getLogger("prefopt")

# the groups an eval of a run takes from the run's checkpoint: what was trained and how it was evaluated
RUN_GROUPS = ("loss", "model", "dataset", "trainer", "reference", "dynamics")
THIS_COMMAND_GROUPS = ("hardware", "logger", "sweep", "eval", "hydra")  # where and how this eval runs: never the run's
POLICY_KINDS = "a run dir, a checkpoint dir (RUN_DIR/checkpoints/step-N), an HF model dir or a hub id"


def policy_argument(argv: list[str]) -> list[str]:
    """`prefopt eval X ...` -> `prefopt eval eval.policy=X ...`: a first argument that is neither an
    override nor an option names the policy (quoted for Hydra when it holds characters its grammar uses)."""
    if not argv or "=" in argv[0] or argv[0].startswith("-"):
        return argv
    value = argv[0]
    if any(not (char.isalnum() or char in "_-./~+:@") for char in value):
        value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [f"eval.policy={value}", *argv[1:]]


def checkpoint_of(policy: str) -> Optional[Path]:
    """The checkpoint a policy path names (a checkpoint, its policy/ dir, or a run dir's newest valid one),
    or None when it is a model (an HF dir or a hub id). A path that is none of these is an error."""
    path = Path(policy).expanduser()
    if path.name == "policy" and checkpoint_candidates(path.parent) == [path.parent]:
        path = path.parent  # RUN_DIR/checkpoints/step-N/policy: the checkpoint itself, with its config
    if path.is_dir() and ((path / "config.json").is_file() or is_adapter_dir(path)):
        return None
    if path.is_dir():
        return find_checkpoint(str(path), path, key="eval.policy")
    if path.exists() or names_local_path(policy):
        raise ConfigError(
            f"eval.policy={policy}: {'not a directory' if path.exists() else 'does not exist'}; give {POLICY_KINDS}"
        )
    return None  # a hub id: resolve_model_source says whether it can be found


def policy_source(cfg: DictConfig) -> Optional[ModelSource]:
    """Where the evaluated model's weights are (eval.policy as a model), or None for a checkpoint or the base model."""
    policy = cfg.eval.policy
    if not policy or checkpoint_candidates(Path(policy).expanduser()):
        return None
    path = Path(policy).expanduser()
    if is_adapter_dir(path):
        return ModelSource("dir", str(path), f"dir:{path.resolve()}")
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.source, model_cfg.path = "hub", str(policy)
    try:
        return resolve_model_source(model_cfg)
    except ModelNotFoundError:
        raise ModelNotFoundError(
            f"eval.policy={policy}: not a local path, and as a hub id it is not in the local Hugging Face "
            f"cache and the hub cannot be reached (offline); download it on a machine with internet "
            f"(hf download {policy} --local-dir DIR) and give eval.policy=DIR"
        ) from None


def take_run_config(cfg: DictConfig, checkpoint: Path, overrides: list[str]) -> None:
    """In place: cfg's RUN_GROUPS become the checkpoint's, then every key or group named in `overrides`
    gets its command-line value back (Hydra composed it into cfg already)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from prefopt.worker import load_frozen_config

    composed = copy.deepcopy(cfg)
    saved = load_frozen_config(checkpoint / CHECKPOINT_CONFIG)
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
    cfg.eval.policy = str(checkpoint.resolve())  # the frozen config names the exact checkpoint evaluated


def prepare_eval(cfg: DictConfig, hydra_dir: Path, overrides: list[str]) -> Path:
    """Parent side: settle which policy and config, check the models can be found, freeze the eval's run dir
    (launch.prepare_run: validation, run dir lock, config.yaml). cfg is updated in place; returns the run dir."""
    from prefopt.launch import prepare_run

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
    if OmegaConf.select(cfg, "hardware.launcher") == "slurm":
        raise ConfigError(
            f"hardware={cfg.hardware.name} (launcher: slurm): prefopt eval runs where it is started; use a local "
            f"preset (hardware=cpu, gpu or cpu_2proc), e.g. inside an salloc/srun allocation"
        )
    cfg.trainer.resume = False
    return prepare_run(cfg, hydra_dir, overrides)


def policy_step(cfg: DictConfig) -> int:
    """The training step the policy's metrics are logged at: a checkpoint's own step (scheduled losses such as
    dpo_shift evaluate at that step's progress, as the run did); a model is taken as trained to trainer.max_steps."""
    if not cfg.eval.policy:
        return 0
    candidates = checkpoint_candidates(Path(cfg.eval.policy))
    return int(load_trainer_state(candidates[0])["step"]) if candidates else cfg.trainer.max_steps


def load_evaluated_weights(cfg: DictConfig, policy) -> None:
    """The evaluated weights into the policy, in place (it was the base model until now)."""
    from prefopt.engine import load_policy_weights

    source = policy_source(cfg)
    location = source.location if source is not None else str(Path(cfg.eval.policy) / "policy")
    try:
        load_policy_weights(policy, location, local_files_only=source is None or source.kind != "hub")
    except (RuntimeError, ValueError, KeyError) as error:
        raise ConfigError(
            f"eval.policy={cfg.eval.policy}: its weights do not fit model={cfg.model.name} "
            f"({str(error).strip().splitlines()[0]}); give model= (and model.path=) the policy's base model"
        ) from None


def evaluate_run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Worker side: build as training does, evaluate the base model (eval.baseline) and then the policy with the
    trainer's own eval and probe functions, and write metrics.jsonl, dynamics.jsonl and summary.json."""
    from prefopt.console import Console, quiet_known_noise
    from prefopt.data import build_preference_data
    from prefopt.distributed import device_for, init_distributed
    from prefopt.dynamics import build_probe_set
    from prefopt.evaluation import RunEvaluator, eval_changes
    from prefopt.losses import get_loss
    from prefopt.models import load_tokenizer
    from prefopt.plots import plot_runs
    from prefopt.reference import build_reference
    from prefopt.schedules import settle_max_steps
    from prefopt.tracking import Tracker
    from prefopt.trainer import PreferenceStep, build_policy

    started = time.time()
    dist = init_distributed(cfg.hardware)
    device = device_for(cfg.hardware, dist)
    quiet_known_noise(cfg.hardware.device, cfg.logger.wandb.mode)
    torch.manual_seed(cfg.trainer.seed)
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    data = build_preference_data(cfg.dataset, tokenizer, cfg.trainer.seed)
    settle_max_steps(cfg, len(data.train), dist.world_size, None)  # a model dir's eval with trainer.num_epochs composed
    policy = build_policy(cfg, source, tokenizer, device)
    # the reference is the base model, built (copied, or precomputed for the eval pairs) before the trained weights load
    reference = build_reference(
        cfg, policy, source, data.eval, get_loss(cfg.loss.name).needs_reference, dist, device, tokenizer.pad_token_id
    )
    step_fn = PreferenceStep(cfg, policy, reference, device, tokenizer.pad_token_id)
    probes = (
        build_probe_set(data, cfg.dynamics.num_probes, cfg.trainer.seed, len(tokenizer), set(tokenizer.all_special_ids))
        if cfg.dynamics.enabled
        else None
    )
    step = policy_step(cfg)
    tracker = Tracker(cfg, run_dir, enabled=dist.is_main)
    console = Console(cfg.logger.console, run_dir, cfg.logger.wandb.mode, enabled=dist.is_main)
    evaluator = RunEvaluator(cfg, step_fn, tokenizer, data, probes, device, dist, tracker, console)
    try:
        tracker.log(0, {f"data/{key}": value for key, value in data.stats.items()})
        first_eval, first_greedy, first_dynamics = {}, None, {}
        if cfg.eval.baseline or not cfg.eval.policy:
            first_eval, first_greedy = evaluator.held_out(0, generate=True)
            first_dynamics = evaluator.probe_set(0)
        if cfg.eval.policy:
            load_evaluated_weights(cfg, policy)
            final_eval, final_greedy = evaluator.held_out(step, generate=True)
            final_dynamics = evaluator.probe_set(step)
        else:  # the base model alone: its one evaluation is the final one
            final_eval, final_greedy, final_dynamics = first_eval, first_greedy, first_dynamics
            first_eval, first_greedy, first_dynamics = {}, None, {}
        summary = {
            "steps": step,
            "eval_seconds": time.time() - started,
            "policy": cfg.eval.policy or f"base: {source.identity}",
            **final_eval,
            **{f"data/{key}": value for key, value in data.stats.items()},
        }
        summary |= eval_changes(first_eval, final_eval, first_greedy, final_greedy, first_dynamics, final_dynamics)
        if probes is not None and dist.is_main:
            plot_runs([run_dir], run_dir / "dynamics.png")
        tracker.finish(summary)
        return summary
    finally:
        console.close()
        tracker.close()
