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

from prefopt.core.distributed import leave_distributed
from prefopt.core.errors import stop_exception
from prefopt.core.runfiles import METRICS_FILE
from prefopt.core.slurm import preemption
from prefopt.model.compile import compile_seconds
from prefopt.observe.displacement import ALARM_METRIC
from prefopt.observe.tracking import read_jsonl
from prefopt.train.build import BuiltRun, build_run
from prefopt.train.evaluation import eval_changes
from prefopt.train.flops import count_parameters, peak_tflops, step_model_flops
from prefopt.train.guards import StepGuard
from prefopt.train.interrupt import DeferredInterrupt
from prefopt.train.metrics import finish_token_means, mean_metrics, reduce_loss_metrics
from prefopt.train.reference import ModelReference, training_reference_pairs
from prefopt.train.sharding import largest_batch_tokens, pair_scored_tokens
from prefopt.train.state import TrainState, resume_training, save_training
from prefopt.train.step import StepResult

log = logging.getLogger("prefopt")


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    trainer_cfg = cfg.trainer
    run = build_run(cfg, run_dir, training_reference_pairs, with_engine=True, record_max_steps=True)
    try:
        state = resume_training(run)  # step 0, or a checkpoint's step with its weights, data position and RNG
        evaluator = run.open_tracker(state.step, state.tracker_rows, state.token_baseline)
        if state.step:  # the alarm's window goes on from the rows up to the checkpoint (cut back to them just now)
            state.displacement.replay(read_jsonl(run.run_dir / METRICS_FILE), up_to_step=state.step)
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
        sound_alarm(run, state.displacement.held_out(max_steps, final_eval), max_steps)
        final_dynamics = evaluator.probe_set(max_steps)
        already_saved = trainer_cfg.save_every and max_steps % trainer_cfg.save_every == 0
        if trainer_cfg.save_final and not already_saved:
            save_training(run, state, max_steps)
        summary = {"steps": max_steps, "train_seconds": time.time() - started, **final_eval, **run.data_metrics()}
        if state.data_record["changed_at_steps"]:  # resumed on other data (allowed): the numbers mix two datasets
            summary["data/changed_at_step"] = state.data_record["changed_at_steps"][-1]
        summary |= eval_changes(
            state.first_eval, final_eval, state.first_greedy, final_greedy, state.first_dynamics, final_dynamics
        )
        summary |= state.displacement.summary()
        if run.reference_sync is not None:
            summary |= run.reference_sync.summary()
        run.finish(summary, closing_summary=True)
        return summary
    finally:
        run.close()


def train_steps(run: BuiltRun, state: TrainState) -> Optional[int]:
    """Steps state.step + 1 to trainer.max_steps; returns the step it stopped after (trainer.stop_after), else None.
    A stop signal or a SLURM preemption checkpoints the step it arrived in (then stops, or requeues)."""
    cfg, dist, trainer_cfg = run.cfg, run.dist, run.cfg.trainer
    num_params, trainable_params = count_parameters(run.policy, cfg.hardware)
    peak = peak_tflops(cfg.hardware, run.device)
    run.console.start_training(state.step, trainer_cfg.max_steps, *run.evaluator.pass_plan())
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
            if run.reference_sync is not None:  # TR-DPO: after the optimizer step, as TRL's on_step_end
                run.reference_sync.after_step(step)
            state.step_done(step)
            elapsed = time.time() - step_started
            metrics, alarm = None, None
            if step % trainer_cfg.log_every == 0 or step == trainer_cfg.max_steps:
                metrics = finish_token_means(mean_metrics(parts, "train", dist), "train")
                metrics |= reduce_loss_metrics(loss_metric_parts, dist)
                total_tokens = dist.sum(tokens)
                reference_forward = isinstance(run.step_fn.reference, ModelReference)
                flops = step_model_flops(num_params, trainable_params, total_tokens, reference_forward)
                tflops = flops / elapsed / 1e12
                metrics |= {
                    "train/grad_norm": grad_norm,
                    "train/learning_rate": lr,  # TRL's name (old run dirs: train/lr, read as this by metric_names)
                    "train/tokens_per_s": total_tokens / elapsed,
                    "train/epoch": state.sampler.epoch,
                    "train/tflops": tflops,
                    "train/skipped_steps": guard.skipped_steps + (not applied),
                }
                if trainer_cfg.compile:  # cumulative: the first step's includes compiling the layers
                    metrics["train/compile_s"] = compile_seconds()
                if peak:
                    metrics["train/mfu"] = tflops / (peak * dist.world_size)
                if run.reference_sync is not None:
                    metrics |= run.reference_sync.metrics()
                alarm = state.displacement.update(step, metrics)
                if alarm:
                    metrics[ALARM_METRIC] = 1.0
                run.tracker.log(step, metrics)
            run.console.step_done(step, metrics)  # after the metrics: the bar and the step line show this step's loss
            sound_alarm(run, alarm)
            if trainer_cfg.eval_every and step % trainer_cfg.eval_every == 0 and step < trainer_cfg.max_steps:
                held_out, _ = run.evaluator.held_out(step, generate=False)
                sound_alarm(run, state.displacement.held_out(step, held_out), step)
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


def sound_alarm(run: BuiltRun, line: Optional[str], eval_step: Optional[int] = None) -> None:
    """The likelihood-displacement alarm's line (observe/displacement.py), when it fired: in the console and as a
    W&B alert; fired by a held-out eval (eval_step), also train/displacement_alarm = 1 at that step (a train step's
    row carries it already)."""
    if not line:
        return
    if eval_step is not None:
        run.tracker.log(eval_step, {ALARM_METRIC: 1.0})
    run.console.alarm(line)
    run.tracker.alert("likelihood displacement", line)


def micro_step(run: BuiltRun, state: TrainState, step: int) -> StepResult:
    """One micro batch of `step`: every rank draws the same global micro batch and scores its own slice of it."""
    dist, micro_batch, train_pairs = run.dist, run.cfg.trainer.micro_batch_size, run.data.train
    global_indices = state.sampler.next_indices(micro_batch * dist.world_size)
    pairs = [train_pairs[i] for i in global_indices[dist.rank * micro_batch : (dist.rank + 1) * micro_batch]]
    # every rank calls the head as often as the rank with the most tokens (ZeRO-3 gathers it per call)
    rank_batches = [global_indices[r * micro_batch : (r + 1) * micro_batch] for r in range(dist.world_size)]
    peer_tokens = largest_batch_tokens(rank_batches, lambda index: pair_scored_tokens(train_pairs[index]))
    return run.step_fn(pairs, step - 1, min_scored_tokens=peer_tokens)
