"""The training recipe, top to bottom: build, resume, evaluate the base model, train (step, log, evaluate, checkpoint,
stop when asked), evaluate the trained policy, summarize. The parts are in prefopt/train/: build.py (the build step
shared with `prefopt eval`), state.py (resume, checkpoints), step.py (the step), interrupt.py (Ctrl-C, SIGTERM)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

<<<<<<< HEAD
from prefopt.core.distributed import leave_distributed
from prefopt.core.errors import stop_exception
from prefopt.core.slurm import preemption
from prefopt.train.build import BuiltRun, build_run
from prefopt.train.evaluation import eval_changes
from prefopt.train.flops import count_parameters, peak_tflops, step_model_flops
from prefopt.train.guards import StepGuard
from prefopt.train.interrupt import DeferredInterrupt
from prefopt.train.metrics import finish_token_means, mean_metrics, reduce_loss_metrics
from prefopt.train.reference import ModelReference, training_reference_pairs
=======
from prefopt.core.distributed import DistInfo, device_for, init_distributed, leave_distributed
from prefopt.core.errors import CheckpointError, stop_exception
from prefopt.core.runfiles import CHECKPOINTS, CONFIG_FILE, DATA_FILE, DYNAMICS_PLOT
from prefopt.core.slurm import in_slurm_task, preemption, restart_count
from prefopt.data import PreferenceData, TokenizedPair, build_preference_data
from prefopt.data.identity import OVERRIDE_KEY, check_resume_data, data_identity, write_data_record
from prefopt.data.layout import build_batch, pair_groups
from prefopt.data.sampler import PairSampler, training_sampler  # noqa: F401 (PairSampler: scripts import it from here)
from prefopt.losses import get_loss, preference_loss
from prefopt.model.loading import apply_lora, load_model, load_tokenizer, resolve_model_source
from prefopt.model.logps import check_logits_path, check_packed_path, sequence_logps, split_pairs
from prefopt.model.precision import set_compute_dtype
from prefopt.observe.console import Console, quiet_known_noise
from prefopt.observe.plots import plot_runs
from prefopt.observe.tracking import Tracker
from prefopt.train.checkpoint import find_checkpoint, load_trainer_state, restore_retired, save_checkpoint
from prefopt.train.dynamics import build_probe_set
from prefopt.train.engine import build_engine
from prefopt.train.evaluation import RunEvaluator, eval_changes, evaluate  # noqa: F401 (evaluate: tests import it from here)
from prefopt.train.guards import NonFiniteTrainingError, StepGuard
from prefopt.train.metrics import finish_token_means, pair_metrics
from prefopt.train.reference import CachedReference, ModelReference, build_reference
from prefopt.train.schedules import settle_max_steps
>>>>>>> runfiles
from prefopt.train.sharding import largest_batch_tokens, pair_scored_tokens
from prefopt.train.state import TrainState, resume_training, save_training
from prefopt.train.step import StepResult

log = logging.getLogger("prefopt")


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    trainer_cfg = cfg.trainer
<<<<<<< HEAD
    run = build_run(cfg, run_dir, training_reference_pairs, with_engine=True, record_max_steps=True)
=======
    dist = init_distributed(cfg.hardware)
    device = device_for(cfg.hardware, dist)
    quiet_known_noise(cfg.hardware.device, cfg.logger.wandb.mode)
    console = Console(
        cfg.logger.console, run_dir, cfg.logger.wandb.mode, enabled=dist.is_main
    )  # progress, eval lines, summary
    torch.manual_seed(trainer_cfg.seed)
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)

    # --- build: tokenizer, data, policy, frozen reference (only when the loss needs one)
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    data: PreferenceData = build_preference_data(cfg.dataset, tokenizer, trainer_cfg.seed)
    data_record = {**data_identity(data), "changed_at_steps": []}  # what the run trains on: every checkpoint keeps it
    settle_max_steps(
        cfg, len(data.train), dist.world_size, run_dir / CONFIG_FILE if dist.is_main else None
    )  # trainer.num_epochs
    policy = build_policy(cfg, source, tokenizer, device)
    policy.train()
    # the reference is the initial policy: built (copied, or precomputed) before DeepSpeed wraps it
    needs_reference = get_loss(cfg.loss.name).needs_reference
    with console.phase("reference log-probs"):
        reference = build_reference(
            cfg,
            policy,
            source,
            reference_pairs(data, cfg, dist.world_size),
            needs_reference,
            dist,
            device,
            tokenizer.pad_token_id,
        )
    engine = build_engine(policy, cfg, dist.world_size)
    policy = engine.model
    sampler = training_sampler(data.train, trainer_cfg, dist.world_size)
    num_params, trainable_params = count_parameters(policy, cfg.hardware)
    peak = peak_tflops(cfg.hardware, device)
    step_fn = PreferenceStep(cfg, policy, reference, device, tokenizer.pad_token_id)
    probes = (
        build_probe_set(data, cfg.dynamics.num_probes, trainer_cfg.seed, len(tokenizer), set(tokenizer.all_special_ids))
        if cfg.dynamics.enabled
        else None
    )

    # --- resume: weights, optimizer, schedule, data position, RNG
    start_step, first_eval, first_greedy, first_dynamics = 0, {}, None, {}
    if dist.is_main:
        restore_retired(
            run_dir / CHECKPOINTS
        )  # a save of the same step killed mid-replace (the parent did it too, unless sbatch)
    dist.barrier()
    checkpoint = find_checkpoint(
        trainer_cfg.resume, run_dir, cfg, missing_ok=restart_count() > 0
    )  # requeued before its first save: step 0
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        if (
            state["step"] > trainer_cfg.max_steps
        ):  # before the weights load: trainer.num_epochs fewer than it has trained
            raise CheckpointError(
                f"trainer.resume: checkpoint {checkpoint} is at step {state['step']}, past this run's "
                f"trainer.max_steps={trainer_cfg.max_steps}; resume with a length that includes it"
            )
        engine.load(checkpoint)
        start_step, first_eval, first_greedy, first_dynamics = (
            state["step"],
            state["first_eval"],
            state["first_greedy_accuracy"],
            state["first_dynamics"],
        )
        sampler = training_sampler(data.train, trainer_cfg, dist.world_size, state["sampler"])
        restore_rng_states(state["rng"])
        log.info("resumed from %s at step %d", checkpoint, start_step)
        # other data than the checkpoint trained on: refused (the parent checked too), or allowed and recorded
        changed = check_resume_data(state.get("data"), data_record, checkpoint, trainer_cfg.resume_data_changed)
        data_record["changed_at_steps"] = [
            *(state.get("data") or {}).get("changed_at_steps", []),
            *([start_step] if changed else []),
        ]
        if changed:
            log.warning(
                "resumed at step %d on changed data (%s=allow): %s", start_step, OVERRIDE_KEY, "; ".join(changed)
            )

    if dist.is_main:
        write_data_record(run_dir / DATA_FILE, data_record)
    tracker = Tracker(
        cfg,
        run_dir,
        resume_step=start_step,
        enabled=dist.is_main,
        resume_rows=state.get("tracker_rows") if checkpoint is not None else None,
    )
>>>>>>> runfiles
    try:
        state = resume_training(run)  # step 0, or a checkpoint's step with its weights, data position and RNG
        evaluator = run.open_tracker(resume_step=state.step, resume_rows=state.tracker_rows)
        if state.step == 0:
            run.tracker.log(0, run.data_metrics())
            state.first_eval, state.first_greedy = evaluator.held_out(0, generate=True)
            state.first_dynamics = evaluator.probe_set(0)

        started = time.time()
        stopped_at = train_steps(run, state)
        if stopped_at is not None:
            return {"stopped_at": stopped_at}

        max_steps = trainer_cfg.max_steps
        final_eval, final_greedy = evaluator.held_out(max_steps, generate=True)
        final_dynamics = evaluator.probe_set(max_steps)
        already_saved = trainer_cfg.save_every and max_steps % trainer_cfg.save_every == 0
        if trainer_cfg.save_final and not already_saved:
<<<<<<< HEAD
            save_training(run, state, max_steps)
        summary = {"steps": max_steps, "train_seconds": time.time() - started, **final_eval, **run.data_metrics()}
        if state.data_record["changed_at_steps"]:  # resumed on other data (allowed): the numbers mix two datasets
            summary["data/changed_at_step"] = state.data_record["changed_at_steps"][-1]
        summary |= eval_changes(
            state.first_eval, final_eval, state.first_greedy, final_greedy, state.first_dynamics, final_dynamics
        )
        run.finish(summary, closing_summary=True)
=======
            save(trainer_cfg.max_steps)
        summary = {"steps": trainer_cfg.max_steps, "train_seconds": time.time() - started, **final_eval}
        summary |= {f"data/{key}": value for key, value in data.stats.items()}
        if data_record[
            "changed_at_steps"
        ]:  # resumed on other data (resume_data_changed=allow): the numbers mix two datasets
            summary["data/changed_at_step"] = data_record["changed_at_steps"][-1]
        summary |= eval_changes(first_eval, final_eval, first_greedy, final_greedy, first_dynamics, final_dynamics)
        if probes is not None and dist.is_main:
            plot_runs([run_dir], run_dir / DYNAMICS_PLOT)
        tracker.finish(summary)
        console.finish(summary)
>>>>>>> runfiles
        return summary
    finally:
        run.close()


def train_steps(run: BuiltRun, state: TrainState) -> Optional[int]:
    """Steps state.step + 1 to trainer.max_steps; returns the step it stopped after (trainer.stop_after), else None.
    A stop signal or a SLURM preemption checkpoints the step it arrived in (then stops, or requeues)."""
    cfg, dist, trainer_cfg = run.cfg, run.dist, run.cfg.trainer
    num_params, trainable_params = count_parameters(run.policy, cfg.hardware)
    peak = peak_tflops(cfg.hardware, run.device)
    run.console.start_training(state.step, trainer_cfg.max_steps)
    guard = StepGuard(trainer_cfg.max_skipped_steps)
    state.step_done(state.step)  # the data position and RNG after the last whole step
    interrupt = DeferredInterrupt(enabled=trainer_cfg.save_on_interrupt)
    try:
        for step in range(state.step + 1, trainer_cfg.max_steps + 1):
            step_started = time.time()
            parts, loss_metric_parts, tokens, poisoned = [], [], 0, False
            for _ in range(trainer_cfg.grad_accum):
                result = micro_step(run, state, step)
                if dist.minimum(float(torch.isfinite(result.loss.detach()).item())) == 1.0:  # every rank agrees
                    run.engine.backward(result.loss / trainer_cfg.grad_accum)
                else:
                    run.engine.skip_micro_step()
                    poisoned = True
                parts.append(result.per_example)
                tokens += result.tokens
                loss_metric_parts.append(result.loss_metrics)
            lr = run.engine.lr
            grad_norm, applied = run.engine.step(poisoned)
            state.step_done(step)
            elapsed = time.time() - step_started
            run.console.step_done(step)
            if step % trainer_cfg.log_every == 0 or step == trainer_cfg.max_steps:
                metrics = finish_token_means(mean_metrics(parts, "train", dist), "train")
                metrics |= reduce_loss_metrics(loss_metric_parts, dist)
                total_tokens = dist.sum(tokens)
                reference_forward = isinstance(run.step_fn.reference, ModelReference)
                flops = step_model_flops(num_params, trainable_params, total_tokens, reference_forward)
                tflops = flops / elapsed / 1e12
                metrics |= {
                    "train/grad_norm": grad_norm,
                    "train/lr": lr,
                    "train/tokens_per_s": total_tokens / elapsed,
                    "train/epoch": state.sampler.epoch,
                    "train/tflops": tflops,
                    "train/skipped_steps": guard.skipped_steps + (not applied),
                }
                if peak:
                    metrics["train/mfu"] = tflops / (peak * dist.world_size)
                run.tracker.log(step, metrics)
                run.console.log_step(step, metrics)
            if trainer_cfg.eval_every and step % trainer_cfg.eval_every == 0 and step < trainer_cfg.max_steps:
                run.evaluator.held_out(step, generate=False)
            if run.probes is not None and step % cfg.dynamics.every_n_steps == 0 and step < trainer_cfg.max_steps:
                run.evaluator.probe_set(step)
            guard.after_step(step, applied, grad_norm)  # too many non-finite steps in a row: stop here
            if trainer_cfg.save_every and step % trainer_cfg.save_every == 0:
                save_training(run, state, step)
            preempted, stop = interrupt.requested(dist)  # what any rank received, agreed in one all-reduce
            if preempted:  # SLURM time limit / preemption: checkpoint this step, then requeue
                save_training(run, state, step)
                preemption.requeue(dist)
            if stop:  # Ctrl-C or SIGTERM: taken at this step boundary by every rank, never inside an update
                save_training(run, state, step)
                log.warning("stopped: checkpoint of step %d written in %s", step, run.run_dir)  # the CLI prints resume
                leave_distributed()  # every rank stops here: tear gloo down in order
                raise stop_exception(stop)
            if trainer_cfg.stop_after is not None and trainer_cfg.stop_after <= step < trainer_cfg.max_steps:
                log.warning("stopping after step %d (trainer.stop_after)", step)
                return step
        return None
    finally:
        interrupt.restore()


def micro_step(run: BuiltRun, state: TrainState, step: int) -> StepResult:
    """One micro batch of `step`: every rank draws the same global micro batch and scores its own slice of it."""
    dist, micro_batch, train_pairs = run.dist, run.cfg.trainer.micro_batch_size, run.data.train
    global_indices = state.sampler.next_indices(micro_batch * dist.world_size)
    pairs = [train_pairs[i] for i in global_indices[dist.rank * micro_batch : (dist.rank + 1) * micro_batch]]
    # every rank calls the head as often as the rank with the most tokens (ZeRO-3 gathers it per call)
    rank_batches = [global_indices[r * micro_batch : (r + 1) * micro_batch] for r in range(dist.world_size)]
    peer_tokens = largest_batch_tokens(rank_batches, lambda index: pair_scored_tokens(train_pairs[index]))
    return run.step_fn(pairs, step - 1, min_scored_tokens=peer_tokens)
