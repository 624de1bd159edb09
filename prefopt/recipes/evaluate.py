"""`prefopt eval`'s worker job: build as training does, evaluate the base model (eval.baseline) and then the policy
with the trainer's own eval and probe functions, into a run dir that `prefopt plot` and `prefopt report` read like a
training run's. The parent half (which policy, which config) is run/eval_run.py.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from prefopt.core.errors import ConfigError, ModelNotFoundError
from prefopt.core.runfiles import POLICY_DIR
from prefopt.model.loading import ModelSource, names_local_path, resolve_model_source
from prefopt.train.build import build_run
from prefopt.train.checkpoint import checkpoint_candidates, find_checkpoint, load_trainer_state
from prefopt.train.engine import is_adapter_dir, load_policy_weights
from prefopt.train.evaluation import eval_changes
from prefopt.train.reference import eval_reference_pairs

POLICY_KINDS = "a run dir, a checkpoint dir (RUN_DIR/checkpoints/step-N), an HF model dir or a hub id"


def checkpoint_of(policy: str, key: str = "eval.policy") -> Optional[Path]:
    """The checkpoint a policy path names (a checkpoint, its policy/ dir, or a run dir's newest valid one),
    or None when it is a model (an HF dir or a hub id). A path that is none of these is an error."""
    path = Path(policy).expanduser()
    if path.name == POLICY_DIR and checkpoint_candidates(path.parent) == [path.parent]:
        path = path.parent  # RUN_DIR/checkpoints/step-N/policy: the checkpoint itself, with its config
    if path.is_dir() and ((path / "config.json").is_file() or is_adapter_dir(path)):
        return None
    if path.is_dir():
        return find_checkpoint(str(path), path, key=key)
    if path.exists() or names_local_path(policy):
        raise ConfigError(
            f"{key}={policy}: {'not a directory' if path.exists() else 'does not exist'}; give {POLICY_KINDS}"
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


def policy_step(cfg: DictConfig) -> int:
    """The training step the policy's metrics are logged at: a checkpoint's own step (scheduled losses such as
    dpo_shift evaluate at that step's progress, as the run did); a model is taken as trained to trainer.max_steps."""
    if not cfg.eval.policy:
        return 0
    candidates = checkpoint_candidates(Path(cfg.eval.policy))
    return int(load_trainer_state(candidates[0])["step"]) if candidates else cfg.trainer.max_steps


def load_evaluated_weights(cfg: DictConfig, policy) -> None:
    """The evaluated weights into the policy, in place (it was the base model until now)."""
    source = policy_source(cfg)
    location = source.location if source is not None else str(Path(cfg.eval.policy) / POLICY_DIR)
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
    started = time.time()
    # the reference is the base model, built (copied, or precomputed for the eval pairs) before the trained weights load
    run = build_run(cfg, run_dir, eval_reference_pairs, with_engine=False, record_max_steps=False)
    try:
        step = policy_step(cfg)
        evaluator = run.open_tracker()
        run.tracker.log(0, run.data_metrics())
        first_eval, first_greedy, first_dynamics = {}, None, {}
        if cfg.eval.baseline or not cfg.eval.policy:
            first_eval, first_greedy = evaluator.held_out(0, generate=True)
            first_dynamics = evaluator.probe_set(0)
        if cfg.eval.policy:
            load_evaluated_weights(cfg, run.policy)
            final_eval, final_greedy = evaluator.held_out(step, generate=True)
            final_dynamics = evaluator.probe_set(step)
        else:  # the base model alone: its one evaluation is the final one
            final_eval, final_greedy, final_dynamics = first_eval, first_greedy, first_dynamics
            first_eval, first_greedy, first_dynamics = {}, None, {}
        summary = {
            "steps": step,
            "eval_seconds": time.time() - started,
            "policy": cfg.eval.policy or f"base: {run.source.identity}",
            **final_eval,
            **run.data_metrics(),
        }
        summary |= eval_changes(first_eval, final_eval, first_greedy, final_greedy, first_dynamics, final_dynamics)
        run.finish(summary, closing_summary=False)
        return summary
    finally:
        run.close()
