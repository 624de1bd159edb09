"""The build step of a worker job, written once for training (recipes/train.py) and `prefopt eval`
(recipes/evaluate.py): distributed init, seed and threads, console, tokenizer, data, the run's length, the policy,
the frozen reference, the engine (training only), the step, the probe set; then the tracker and the evaluator
(training opens them after its resume), and the shared tail (plot, summary, close).

What differs between the two jobs is a parameter of build_run, never a second copy: which pairs the reference
scores, whether an engine (optimizer, schedule) wraps the policy, whether the settled trainer.max_steps is
recorded in the run dir's config.yaml."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from omegaconf import DictConfig

from prefopt.core.distributed import DistInfo, device_for, init_distributed
from prefopt.core.runfiles import CONFIG_FILE, DYNAMICS_PLOT
from prefopt.data import PreferenceData, TokenizedPair, build_preference_data
from prefopt.data.identity import data_identity
from prefopt.data.layout import BatchLayout
from prefopt.losses import loss_plan_of
from prefopt.model.compile import compile_model
from prefopt.model.loading import (
    ModelSource,
    apply_lora,
    load_run_model,
    load_tokenizer,
    resolve_model_source,
    weight_files,
)
from prefopt.model.logps import check_logits_path, check_packed_path
from prefopt.model.naming import loaded_model_line
from prefopt.observe.console import Console, quiet_known_noise
from prefopt.observe.plots import plot_runs
from prefopt.observe.token_heatmaps import plot_token_views
from prefopt.observe.tracking import Tracker
from prefopt.train.dynamics import ProbeSet, build_probe_set
from prefopt.train.engine import build_engine
from prefopt.train.evaluation import RunEvaluator
from prefopt.train.inspection import filter_enabled, filter_training_pairs, inspect_pairs
from prefopt.train.onpolicy import is_onpolicy, onpolicy_samples
from prefopt.train.reference import CachedReference, ModelReference, base_fingerprint, build_reference, cover_pairs
from prefopt.train.reference_sync import ReferenceSync, build_reference_sync, moving_reference, reference_moves
from prefopt.train.schedules import settle_max_steps
from prefopt.train.step import PreferenceStep
from prefopt.train.term_grads import TermGradients, term_gradient_pairs
from prefopt.train.token_views import ProbeTokens

log = logging.getLogger("prefopt")

# which pairs the reference scores: (data, cfg, world size) -> pairs (reference.py: training's, eval's)
ReferencePairs = Callable[[PreferenceData, DictConfig, int], list[TokenizedPair]]


def build_policy(cfg: DictConfig, source: ModelSource, tokenizer, device: torch.device, dist: DistInfo):
    """The policy as a run starts it (training, and `prefopt eval` before it loads the trained weights): the base
    model with fp32 master weights, its compute dtype, its log-prob paths checked, LoRA adapters when enabled.
    Rank 0 logs which weights these are (loaded_model_line)."""
    policy = load_run_model(cfg.model, source, len(tokenizer), cfg.trainer.seed, device, cfg.hardware.engine)
    check_logits_path(policy, len(tokenizer), device)  # the log-probs are the model's own (soft-capping, scaling)
    if cfg.trainer.batching == "packed":
        check_packed_path(
            policy, len(tokenizer), device, BatchLayout.from_trainer(cfg.trainer)
        )  # its attention takes prefix-shared, packed masks
    if cfg.model.lora.enabled:
        policy = apply_lora(policy, cfg.model.lora)
    if cfg.trainer.compile:  # after the checks: they run eagerly, and compiling stays lazy until the first step
        compile_model(policy)
    # the digest the reference cache keys on: of the weight files (memoized) or the tiny model's seed; weights that
    # exist only in memory (a hub download) would have to be hashed whole, so their line goes without
    fingerprint = (
        base_fingerprint(cfg, policy, source, dist)
        if source.kind == "tiny" or weight_files(cfg.model, source)
        else None
    )
    if dist.is_main:
        log.info("%s", loaded_model_line(policy, cfg.model, source, fingerprint))
    return policy


@dataclass
class JobStart:
    """The first parts of every worker job (training, `prefopt eval`, `prefopt inspect`), built in this order."""

    dist: DistInfo
    device: torch.device
    console: Console
    source: ModelSource
    tokenizer: Any
    data: PreferenceData


@dataclass
class BuiltRun(JobStart):
    """The built parts of a training or eval job: its start, then the rest. policy is what the step runs (under
    training, the engine's model)."""

    cfg: DictConfig
    run_dir: Path
    policy: Any
    reference: Optional[ModelReference | CachedReference]
    step_fn: PreferenceStep
    probes: Optional[ProbeSet]
    data_identity: dict[str, Any]  # data/identity.py of the data as built, before dataset.filter (what resume compares)
    term_grads: Optional[TermGradients]  # dynamics.term_grads: per-term gradient norms at the probe steps
    engine: Any = None  # engine.py's TorchEngine or DeepSpeedEngine (training only)
    reference_sync: Optional[ReferenceSync] = None  # reference_sync.py: a moving reference (training only)
    tracker: Optional[Tracker] = None  # open_tracker
    evaluator: Optional[RunEvaluator] = None  # open_tracker

    def open_tracker(
        self,
        resume_step: int = 0,
        resume_rows: Optional[Mapping[str, int]] = None,
        token_baseline: Optional[ProbeTokens] = None,
    ) -> RunEvaluator:
        """The tracker (metrics files, W&B) and the evaluator that logs to it; a resumed run's tracker cuts its files
        back to the checkpoint (resume_step, resume_rows: see Tracker) and its evaluator measures token views from
        the checkpoint's step-0 values (token_baseline)."""
        self.tracker = Tracker(
            self.cfg, self.run_dir, resume_step=resume_step, enabled=self.dist.is_main, resume_rows=resume_rows
        )
        self.evaluator = RunEvaluator(
            self.cfg,
            self.step_fn,
            self.tokenizer,
            self.data,
            self.probes,
            self.term_grads,
            self.device,
            self.dist,
            self.tracker,
            self.console,
            token_baseline,
        )
        return self.evaluator

    def data_metrics(self) -> dict[str, Any]:
        """The data's statistics as logged at step 0 and in the summary: data/*."""
        return {f"data/{key}": value for key, value in self.data.stats.items()}

    def finish(self, summary: Mapping[str, Any], closing_summary: bool) -> None:
        """The tail of a finished job: the dynamics plot, summary.json (and W&B's summary), and with closing_summary
        the console's closing lines (training's; `prefopt eval`'s parent says where its results are)."""
        if self.probes is not None and self.dist.is_main:
            plot_runs([self.run_dir], self.run_dir / DYNAMICS_PLOT)
            if self.cfg.dynamics.token_views and self.cfg.dynamics.token_view_probes:
                plot_token_views(self.run_dir, self.cfg.dynamics.token_view_probes)
        self.tracker.finish(summary)
        if closing_summary:
            self.console.finish(summary)

    def close(self) -> None:
        """However the job ends: the console stops drawing, the tracker closes its files and W&B."""
        self.console.close()
        if self.tracker is not None:
            self.tracker.close()


def start_job(cfg: DictConfig, run_dir: Path) -> JobStart:
    """Distributed init, device, console, seed and threads, the model's source, its tokenizer and the data (arith
    onpolicy: after the base model's samples, train/onpolicy.py)."""
    dist = init_distributed(cfg.hardware)
    device = device_for(cfg.hardware, dist)
    quiet_known_noise(cfg.hardware.device, cfg.logger.wandb.mode)
    console = Console(cfg.logger.console, run_dir, cfg.logger.wandb.mode, enabled=dist.is_main)  # progress, evals
    try:
        torch.manual_seed(cfg.trainer.seed)
        if cfg.hardware.num_threads:
            torch.set_num_threads(cfg.hardware.num_threads)
        source = resolve_model_source(cfg.model)
        tokenizer = load_tokenizer(cfg.model, source)
        samples = None
        if is_onpolicy(cfg.dataset):  # the model's own answers, before the pairs can exist (train/onpolicy.py)
            with console.phase("on-policy samples"):
                samples = onpolicy_samples(cfg, source, tokenizer, dist, device)
        data = build_preference_data(cfg.dataset, tokenizer, cfg.trainer.seed, announce=dist.is_main, samples=samples)
    except BaseException:
        console.close()
        raise
    return JobStart(dist, device, console, source, tokenizer, data)


def filter_training_data(cfg: DictConfig, job: JobStart, policy) -> None:
    """dataset.filter: inspect the training pairs with the initial policy (cached) and keep those the filter selects,
    before the run's length, sampler and reference are derived from them."""
    with job.console.phase("inspecting the training pairs (dataset.filter)"):
        inspection = inspect_pairs(
            policy,
            job.data.train,
            cfg,
            job.source.identity,
            base_fingerprint(cfg, policy, job.source, job.dist),
            job.dist,
            job.device,
            job.tokenizer.pad_token_id,
        )
    line = filter_training_pairs(job.data, cfg.dataset.filter, inspection)
    if job.dist.is_main:
        log.info("%s", line)


def build_run(
    cfg: DictConfig,
    run_dir: Path,
    reference_pairs: ReferencePairs,
    with_engine: bool,
    record_max_steps: bool,
) -> BuiltRun:
    """Everything a job needs before its first evaluation or step, built in this order (the order of the random draws
    and of what is printed). reference_pairs: the pairs the reference scores (reference.training_reference_pairs or
    eval_reference_pairs); with_engine: wrap the policy in the training engine (optimizer, schedule), after the
    reference copied it; record_max_steps: rank 0 writes trainer.max_steps derived
    from trainer.num_epochs into the run dir's config.yaml."""
    job = start_job(cfg, run_dir)
    dist, device, console, source, tokenizer, data = (
        job.dist,
        job.device,
        job.console,
        job.source,
        job.tokenizer,
        job.data,
    )
    try:
        policy = build_policy(cfg, source, tokenizer, device, dist)
        policy.train()
        identity = data_identity(data)  # the source's pairs: the parent's resume check builds them without a model
        if filter_enabled(cfg.dataset):  # `prefopt eval` of a filtered run too: its probes draw on the same pairs
            filter_training_data(cfg, job, policy)
        settle_max_steps(
            cfg, len(data.train), dist.world_size, run_dir / CONFIG_FILE if record_max_steps and dist.is_main else None
        )  # trainer.num_epochs
        term_grads_pairs = (
            term_gradient_pairs(data.train, cfg.dynamics.term_grads_pairs, cfg.trainer.seed)
            if cfg.dynamics.enabled and cfg.dynamics.term_grads
            else []
        )
        # the reference is the initial policy: built (copied, or precomputed) before an engine wraps it or `prefopt
        # eval` loads the trained weights into it
        # a moving reference (reference.sync, training only: `prefopt eval` scores against the base model) is live
        moving = with_engine and reference_moves(cfg)
        with console.phase("reference log-probs"):
            if moving:
                reference = moving_reference(cfg, policy, dist.world_size, dist.is_main)
            else:
                reference = build_reference(
                    cfg,
                    policy,
                    source,
                    reference_pairs(data, cfg, dist.world_size),
                    loss_plan_of(cfg.loss).needs_reference,
                    dist,
                    device,
                    tokenizer.pad_token_id,
                )
            # training pairs the sampler may never draw: a precomputed reference scores them too
            cover_pairs(reference, cfg, policy, source, term_grads_pairs, dist, device, tokenizer.pad_token_id)
        engine = build_engine(policy, cfg, dist.world_size) if with_engine else None
        if engine is not None:
            policy = engine.model
        reference_sync = build_reference_sync(cfg, reference, policy) if moving else None
        step_fn = PreferenceStep(cfg, policy, reference, device, tokenizer.pad_token_id)
        term_grads = TermGradients(step_fn, term_grads_pairs) if term_grads_pairs else None
        probes = (
            build_probe_set(
                data, cfg.dynamics.num_probes, cfg.trainer.seed, len(tokenizer), set(tokenizer.all_special_ids)
            )
            if cfg.dynamics.enabled
            else None
        )
    except BaseException:
        console.close()
        raise
    return BuiltRun(
        **vars(job),
        cfg=cfg,
        run_dir=run_dir,
        policy=policy,
        reference=reference,
        step_fn=step_fn,
        probes=probes,
        data_identity=identity,
        term_grads=term_grads,
        engine=engine,
        reference_sync=reference_sync,
    )
