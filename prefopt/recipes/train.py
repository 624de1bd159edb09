"""The training loop, top to bottom: build, (resume), evaluate, step, log, checkpoint, summarize."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy
import torch
from omegaconf import DictConfig, OmegaConf

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
from prefopt.train.sharding import largest_batch_tokens, pair_scored_tokens

log = logging.getLogger("prefopt")


def loss_hyperparameters(loss_cfg: DictConfig) -> dict[str, Any]:
    return {
        key: value
        for key, value in OmegaConf.to_container(loss_cfg, resolve=True).items()
        if key not in ("name", "gate")
    }


class PreferenceStep:
    """Log-probs for a batch of pairs (one concatenated forward) and the configured loss on them."""

    def __init__(
        self,
        cfg: DictConfig,
        policy,
        reference: Optional[ModelReference | CachedReference],
        device: torch.device,
        pad_token_id: int,
    ):
        self.loss_name = cfg.loss.name
        self.gate = OmegaConf.to_container(cfg.loss.gate, resolve=True) if "gate" in cfg.loss else None
        self.hyperparameters = loss_hyperparameters(cfg.loss)
        self.policy, self.reference = policy, reference
        self.device, self.pad_token_id = device, pad_token_id
        self.chunk_size, self.keep_logps_mb = cfg.trainer.logp_chunk_size, cfg.trainer.logp_keep_mb
        self.max_steps = cfg.trainer.max_steps
        self.batching, self.row_tokens = cfg.trainer.batching, cfg.trainer.packed_row_tokens

    def __call__(self, pairs: list[TokenizedPair], step: int, min_scored_tokens: int = 0):
        """min_scored_tokens: see sequence_logps (ranks scoring different pairs in step call the head equally often)."""
        batch = build_batch(pair_groups(pairs), self.pad_token_id, self.batching, self.row_tokens).to(self.device)
        policy = sequence_logps(
            self.policy, batch, self.chunk_size, min_scored_tokens=min_scored_tokens, keep_logps_mb=self.keep_logps_mb
        )
        reference_chosen = reference_rejected = None
        if self.reference is not None:
            reference_chosen, reference_rejected = self.reference.logps(pairs, batch, min_scored_tokens)
        chosen_logps, rejected_logps = split_pairs(policy.summed)
        chosen_lengths, rejected_lengths = split_pairs(policy.lengths)
        chosen_tokens, rejected_tokens = split_pairs(policy.logps)
        chosen_mask, rejected_mask = split_pairs(policy.mask)
        out = preference_loss(
            self.loss_name,
            policy_chosen_logps=chosen_logps,
            policy_rejected_logps=rejected_logps,
            reference_chosen_logps=reference_chosen,
            reference_rejected_logps=reference_rejected,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            chosen_token_logps=chosen_tokens,
            chosen_mask=chosen_mask,
            rejected_token_logps=rejected_tokens,
            rejected_mask=rejected_mask,
            gate=self.gate,
            progress=min(step / self.max_steps, 1.0),
            **self.hyperparameters,
        )
        per_example = {
            "loss": out.losses.detach(),
            **pair_metrics(policy, out.chosen_rewards, out.rejected_rewards),
        }  # TRL's names
        tokens = sum(
            len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids) for pair in pairs
        )  # useful work, any layout
        return out, per_example, tokens


# bf16 dense peak TFLOP/s per device, for MFU (nanoGPT-style: achieved model FLOPs / peak)
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(hardware_cfg: DictConfig, device: torch.device) -> Optional[float]:
    if hardware_cfg.peak_tflops:
        return hardware_cfg.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), None)
    return None


def step_model_flops(num_params: int, trainable_params: int, policy_tokens: int, reference_forward: bool) -> float:
    """Per token: 2 N for the policy's forward, 2 N for the backward through the activations (every
    layer, frozen or not), 2 N_trainable for the weight gradients (6 N for a full fine-tune, ~4 N under
    LoRA), and 2 N more for a reference forward."""
    return (4 * num_params + 2 * trainable_params + (2 * num_params if reference_forward else 0)) * policy_tokens


def reduce_loss_metrics(parts: list[dict[str, float]], dist: DistInfo) -> dict[str, float]:
    """A loss's batch metrics over micro batches and ranks: `*/min` is the global minimum (gate/min),
    everything else the mean of the micro-batch values."""
    reduced = {}
    for key in parts[0]:
        values = [float(part[key]) for part in parts]
        if key.endswith("/min"):
            reduced[f"train/{key}"] = dist.minimum(min(values))
        else:
            reduced[f"train/{key}"] = dist.sum(sum(values) / len(values)) / dist.world_size
    return reduced


def count_parameters(model, hardware_cfg: DictConfig) -> tuple[int, int]:
    """(all, trainable) parameter counts; under ZeRO-3 from the partitioned parameters' full sizes."""

    def size(parameter) -> int:
        return (
            parameter.ds_numel
            if hardware_cfg.engine == "deepspeed" and hardware_cfg.zero_stage == 3
            else parameter.numel()
        )

    parameters = list(model.parameters())
    return sum(size(p) for p in parameters), sum(size(p) for p in parameters if p.requires_grad)


def mean_metrics(per_example_parts: list[dict[str, torch.Tensor]], prefix: str, dist: DistInfo) -> dict[str, float]:
    """Means over every example of every rank (the global batch)."""
    keys = list(per_example_parts[0])
    local = torch.stack([torch.cat([part[key].float().cpu() for part in per_example_parts]) for key in keys])  # (K, N)
    global_values = dist.gather_cat(local.flatten()).view(dist.world_size, len(keys), -1)
    means = global_values.transpose(0, 1).reshape(len(keys), -1).mean(dim=1)  # one collective for every key
    return {f"{prefix}/{key}": float(mean) for key, mean in zip(keys, means)}


def reference_pairs(data: PreferenceData, cfg: DictConfig, world_size: int) -> list[TokenizedPair]:
    """Exactly the pairs the run scores against the reference: the training pairs its seeded sampler will
    draw (so a precomputed reference never does more work than computing it on the fly) and the eval
    pairs its evals score."""
    trainer_cfg = cfg.trainer
    draws = trainer_cfg.max_steps * trainer_cfg.grad_accum * trainer_cfg.micro_batch_size * world_size
    visited = sorted(set(training_sampler(data.train, trainer_cfg, world_size).next_indices(draws)))
    eval_count = (
        len(data.eval)
        if trainer_cfg.max_eval_batches is None
        else trainer_cfg.max_eval_batches * trainer_cfg.eval_batch_size
    )
    return [data.train[index] for index in visited] + data.eval[:eval_count]


def build_policy(cfg: DictConfig, source, tokenizer, device: torch.device):
    """The policy as a run starts it (training, and `prefopt eval` before it loads the trained weights): the base
    model with fp32 master weights, its compute dtype, its log-prob paths checked, LoRA adapters when enabled."""
    policy = load_model(cfg.model, source, len(tokenizer), cfg.trainer.seed).to(device)
    set_compute_dtype(policy, cfg.model.dtype, cfg.hardware.engine)  # bf16: fp32 master weights, bf16 compute
    check_logits_path(policy, len(tokenizer), device)  # the log-probs are the model's own (soft-capping, scaling)
    if cfg.trainer.batching == "packed":
        check_packed_path(policy, len(tokenizer), device)  # its attention takes prefix-shared, packed masks
    if cfg.model.lora.enabled:
        policy = apply_lora(policy, cfg.model.lora)
    return policy


class DeferredInterrupt:
    """Ctrl-C or SIGTERM during training (trainer.save_on_interrupt): the first one only sets a flag, which the loop
    reads at the end of a step; every rank takes it at that same step (one all-reduce: any rank's signal stops all),
    checkpoints that step and stops, so no update is ever cut in half (an interrupt inside the optimizer's step
    would leave half-updated weights). A second signal stops at once. Inside a SLURM task SIGTERM belongs to
    preemption (prefopt/core/slurm.py), which checkpoints and requeues."""

    def __init__(self, enabled: bool):
        self.received = 0  # the first stop signal's number
        self.previous: dict[int, Any] = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, *(() if in_slurm_task() else (signal.SIGTERM,))):
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received:
            raise stop_exception(signum)
        self.received = signum
        name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s: stopping after this step with a checkpoint (again to stop at once)", name)

    def requested(self, dist: DistInfo) -> tuple[bool, int]:
        """(SLURM's time-limit warning or SIGTERM reached some rank: checkpoint and requeue, prefopt/core/slurm.py; the stop
        signal some rank received, 0 for none). Every rank calls this at every step: one all-reduce carries both, so
        a multi-rank run pays one small collective per step for them, and a single rank none."""
        flags = torch.tensor([*preemption.local_flags(), float(self.received)], dtype=torch.float64)
        warned, terminated, stop = dist.all_reduce(flags, torch.distributed.ReduceOp.MAX).tolist()
        return bool(warned or terminated), int(stop)

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous = {}


def rng_states() -> dict[str, Any]:
    """Every generator a step can draw from: torch CPU, every CUDA device, numpy, Python's random."""
    kind, keys, position, has_gauss, cached_gaussian = numpy.random.get_state()
    # plain tensors and containers only, so the checkpoint loads with torch.load(weights_only=True)
    numpy_state = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(numpy.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": numpy_state,
        "python": random.getstate(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    saved = states["numpy"]
    numpy.random.set_state(
        (
            saved["kind"],
            saved["keys"].numpy().astype(numpy.uint32),
            saved["position"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    random.setstate(states["python"])


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
                    out, per_example, batch_tokens = step_fn(pairs, step - 1, min_scored_tokens=peer_tokens)
                    if dist.minimum(float(torch.isfinite(out.loss.detach()).item())) == 1.0:  # every rank agrees
                        engine.backward(out.loss / trainer_cfg.grad_accum)
                    else:
                        engine.skip_micro_step()
                        poisoned = True
                    parts.append(per_example)
                    tokens += batch_tokens
                    loss_metric_parts.append(out.metrics)
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
            plot_runs([run_dir], run_dir / DYNAMICS_PLOT)
        tracker.finish(summary)
        console.finish(summary)
        return summary
    finally:
        console.close()
        tracker.close()
