"""The training loop, top to bottom: build, (resume), evaluate, step, log, checkpoint, summarize."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from prefopt.core.distributed import device_for, init_distributed, leave_distributed
from prefopt.core.errors import CheckpointError, stop_exception
from prefopt.core.slurm import preemption, restart_count
from prefopt.data import PreferenceData, build_preference_data
from prefopt.data.identity import DATA_FILE, OVERRIDE_KEY, check_resume_data, data_identity, write_data_record
from prefopt.data.sampler import training_sampler
from prefopt.losses import get_loss
from prefopt.model.loading import load_tokenizer, resolve_model_source
from prefopt.observe.console import Console, quiet_known_noise
from prefopt.observe.plots import plot_runs
from prefopt.observe.tracking import Tracker
from prefopt.train.build import build_policy
from prefopt.train.checkpoint import CHECKPOINTS, find_checkpoint, load_trainer_state, restore_retired, save_checkpoint
from prefopt.train.dynamics import build_probe_set
from prefopt.train.engine import build_engine
from prefopt.train.evaluation import RunEvaluator, eval_changes
from prefopt.train.flops import count_parameters, peak_tflops, step_model_flops
from prefopt.train.guards import NonFiniteTrainingError, StepGuard
from prefopt.train.interrupt import DeferredInterrupt
from prefopt.train.metrics import finish_token_means, mean_metrics, reduce_loss_metrics
from prefopt.train.reference import ModelReference, build_reference, training_reference_pairs
from prefopt.train.rng import restore_rng_states, rng_states
from prefopt.train.schedules import settle_max_steps
from prefopt.train.sharding import largest_batch_tokens, pair_scored_tokens
from prefopt.train.step import PreferenceStep

log = logging.getLogger("prefopt")


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    trainer_cfg = cfg.trainer
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
        cfg, len(data.train), dist.world_size, run_dir / "config.yaml" if dist.is_main else None
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
            training_reference_pairs(data, cfg, dist.world_size),
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
    try:
        evaluator = RunEvaluator(cfg, step_fn, tokenizer, data, probes, device, dist, tracker, console)
        run_eval, run_probes = evaluator.held_out, evaluator.probe_set

        def save(step: int) -> None:
            """Checkpoint the state after `step` (`completed` is updated at the end of every step)."""
            if dist.minimum(float(engine.parameters_finite())) < 1.0:  # any rank's partition
                raise NonFiniteTrainingError(
                    f"the weights are not finite after step {step}: no checkpoint is written "
                    f"(the last one on disk is intact); lower trainer.lr"
                )
            state = {
                "step": step,
                **completed,
                "first_eval": first_eval,
                "first_greedy_accuracy": first_greedy,
                "first_dynamics": first_dynamics,
                "tracker_rows": dict(tracker.rows),
                "data": data_record,
            }
            save_checkpoint(
                run_dir,
                step,
                engine,
                tokenizer,
                state,
                dist,
                cfg,
                keep=trainer_cfg.save_total_limit,
                protect=checkpoint,
            )

        if start_step == 0:
            tracker.log(0, {f"data/{key}": value for key, value in data.stats.items()})
            first_eval, first_greedy = run_eval(0, generate=True)
            first_dynamics = run_probes(0)

        started = time.time()
        console.start_training(start_step, trainer_cfg.max_steps)
        step = start_step
        guard = StepGuard(trainer_cfg.max_skipped_steps)
        completed = {
            "sampler": sampler.state(),
            "rng": rng_states(),
        }  # the data position and RNG after the last whole step
        interrupt = DeferredInterrupt(enabled=trainer_cfg.save_on_interrupt)
        try:
            for step in range(start_step + 1, trainer_cfg.max_steps + 1):
                step_started = time.time()
                parts, loss_metric_parts, tokens, poisoned = [], [], 0, False
                for _ in range(trainer_cfg.grad_accum):
                    # every rank draws the same global micro batch and trains on its own slice of it
                    global_indices = sampler.next_indices(trainer_cfg.micro_batch_size * dist.world_size)
                    rank_slice = slice(
                        dist.rank * trainer_cfg.micro_batch_size, (dist.rank + 1) * trainer_cfg.micro_batch_size
                    )
                    pairs = [data.train[i] for i in global_indices[rank_slice]]
                    # every rank calls the head as often as the rank with the most tokens (ZeRO-3 gathers it per call)
                    rank_batches = [
                        global_indices[r * trainer_cfg.micro_batch_size : (r + 1) * trainer_cfg.micro_batch_size]
                        for r in range(dist.world_size)
                    ]
                    peer_tokens = largest_batch_tokens(
                        rank_batches, lambda index: pair_scored_tokens(data.train[index])
                    )
                    result = step_fn(pairs, step - 1, min_scored_tokens=peer_tokens)
                    if dist.minimum(float(torch.isfinite(result.loss.detach()).item())) == 1.0:  # every rank agrees
                        engine.backward(result.loss / trainer_cfg.grad_accum)
                    else:
                        engine.skip_micro_step()
                        poisoned = True
                    parts.append(result.per_example)
                    tokens += result.tokens
                    loss_metric_parts.append(result.loss_metrics)
                lr = engine.lr
                grad_norm, applied = engine.step(poisoned)
                completed = {"sampler": sampler.state(), "rng": rng_states()}
                elapsed = time.time() - step_started
                console.step_done(step)
                if step % trainer_cfg.log_every == 0 or step == trainer_cfg.max_steps:
                    metrics = finish_token_means(mean_metrics(parts, "train", dist), "train")
                    metrics |= reduce_loss_metrics(loss_metric_parts, dist)
                    total_tokens = dist.sum(tokens)
                    tflops = (
                        step_model_flops(
                            num_params, trainable_params, total_tokens, isinstance(step_fn.reference, ModelReference)
                        )
                        / elapsed
                        / 1e12
                    )
                    metrics |= {
                        "train/grad_norm": grad_norm,
                        "train/lr": lr,
                        "train/tokens_per_s": total_tokens / elapsed,
                        "train/epoch": sampler.epoch,
                        "train/tflops": tflops,
                        "train/skipped_steps": guard.skipped_steps + (not applied),
                    }
                    if peak:
                        metrics["train/mfu"] = tflops / (peak * dist.world_size)
                    tracker.log(step, metrics)
                    console.log_step(step, metrics)
                if trainer_cfg.eval_every and step % trainer_cfg.eval_every == 0 and step < trainer_cfg.max_steps:
                    run_eval(step, generate=False)
                if probes is not None and step % cfg.dynamics.every_n_steps == 0 and step < trainer_cfg.max_steps:
                    run_probes(step)
                guard.after_step(step, applied, grad_norm)  # too many non-finite steps in a row: stop here
                if trainer_cfg.save_every and step % trainer_cfg.save_every == 0:
                    save(step)
                preempted, stop = interrupt.requested(dist)  # what any rank received, agreed in one all-reduce
                if preempted:  # SLURM time limit / preemption: checkpoint this step, then requeue
                    save(step)
                    preemption.requeue(dist)
                if stop:  # Ctrl-C or SIGTERM: taken at this step boundary by every rank, never inside an update
                    save(step)
                    log.warning(
                        "stopped: checkpoint of step %d written in %s", step, run_dir
                    )  # the CLI prints the resume command
                    leave_distributed()  # every rank stops here: tear gloo down in order
                    raise stop_exception(stop)
                if (
                    trainer_cfg.stop_after is not None
                    and step >= trainer_cfg.stop_after
                    and step < trainer_cfg.max_steps
                ):
                    log.warning("stopping after step %d (trainer.stop_after)", step)
                    return {"stopped_at": step}
        finally:
            interrupt.restore()

        final_eval, final_greedy = run_eval(trainer_cfg.max_steps, generate=True)
        final_dynamics = run_probes(trainer_cfg.max_steps)
        already_saved = trainer_cfg.save_every and trainer_cfg.max_steps % trainer_cfg.save_every == 0
        if trainer_cfg.save_final and not already_saved:
            save(trainer_cfg.max_steps)
        summary = {"steps": trainer_cfg.max_steps, "train_seconds": time.time() - started, **final_eval}
        summary |= {f"data/{key}": value for key, value in data.stats.items()}
        if data_record[
            "changed_at_steps"
        ]:  # resumed on other data (resume_data_changed=allow): the numbers mix two datasets
            summary["data/changed_at_step"] = data_record["changed_at_steps"][-1]
        summary |= eval_changes(first_eval, final_eval, first_greedy, final_greedy, first_dynamics, final_dynamics)
        if probes is not None and dist.is_main:
            plot_runs([run_dir], run_dir / "dynamics.png")
        tracker.finish(summary)
        console.finish(summary)
        return summary
    finally:
        console.close()
        tracker.close()
