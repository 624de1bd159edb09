"""What a training run carries from step to step, in one object: the last whole step, the sampler's position, the
data and RNG state after it, the first evaluation (for the summary's before/after), the data record. Resume fills
it from a checkpoint (weights, optimizer and schedule into the engine); a checkpoint is written from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from prefopt.core.errors import CheckpointError, NonFiniteTrainingError
from prefopt.core.runfiles import CHECKPOINTS, DATA_FILE
from prefopt.core.slurm import restart_count
from prefopt.data.identity import OVERRIDE_KEY, check_resume_data, write_data_record
from prefopt.data.sampler import PairSampler, training_sampler
from prefopt.observe.displacement import DisplacementAlarm
from prefopt.train.build import BuiltRun
from prefopt.train.checkpoint import find_checkpoint, load_trainer_state, restore_retired, save_checkpoint
from prefopt.train.rng import restore_rng_states, rng_states
from prefopt.train.token_views import ProbeTokens

log = logging.getLogger("prefopt")


@dataclass
class TrainState:
    sampler: PairSampler
    data_record: dict[str, Any]  # what the run trains on (data/identity.py): every checkpoint keeps it
    displacement: DisplacementAlarm  # the likelihood-displacement alarm (refilled from metrics.jsonl on resume)
    step: int = 0  # the last whole step: 0 before the first, a checkpoint's step on resume
    first_eval: dict[str, float] = field(default_factory=dict)  # the eval at step 0 (the base model)
    first_greedy: Optional[float] = None
    first_dynamics: dict[str, float] = field(default_factory=dict)
    # a resumed checkpoint's step-0 per-token probe values (dynamics.token_views), handed to the evaluator, which
    # holds the run's baseline from then on (and sets it at step 0 of a fresh run)
    token_baseline: Optional[ProbeTokens] = None
    completed: dict[str, Any] = field(default_factory=dict)  # the data position and RNG after the last whole step
    resumed_from: Optional[Path] = None  # the checkpoint resumed from: never rotated away
    tracker_rows: Optional[dict[str, int]] = None  # its tracker's rows (the files are cut back to them)

    def step_done(self, step: int) -> None:
        """After the optimizer step of `step` (or before the first step of this process: step = self.step)."""
        self.step = step
        self.completed = {"sampler": self.sampler.state(), "rng": rng_states()}

    def checkpoint_contents(
        self, step: int, tracker_rows: dict[str, int], token_baseline: Optional[ProbeTokens]
    ) -> dict[str, Any]:
        """trainer_state.pt of a checkpoint of `step` (everything resume_training reads back); tracker_rows and
        token_baseline are the tracker's and the evaluator's."""
        return {
            "step": step,
            **self.completed,
            "first_eval": self.first_eval,
            "first_greedy_accuracy": self.first_greedy,
            "first_dynamics": self.first_dynamics,
            "token_baseline": token_baseline.state() if token_baseline is not None else None,
            "tracker_rows": tracker_rows,
            "data": self.data_record,
        }


def resume_training(run: BuiltRun) -> TrainState:
    """Step 0, or (trainer.resume) the checkpoint's step with its weights, optimizer, schedule, data position and
    RNG; rank 0 then writes the data record (data.json)."""
    cfg, dist, run_dir, trainer_cfg = run.cfg, run.dist, run.run_dir, run.cfg.trainer
    state = TrainState(
        sampler=training_sampler(run.data.train, trainer_cfg, dist.world_size),
        data_record={**run.data_identity, "changed_at_steps": []},
        displacement=DisplacementAlarm(cfg.logger.displacement_window),
    )
    if dist.is_main:  # a save of the same step killed mid-replace (the parent did it too, unless sbatch)
        restore_retired(run_dir / CHECKPOINTS)
    dist.barrier()
    checkpoint = find_checkpoint(
        trainer_cfg.resume, run_dir, cfg, missing_ok=restart_count() > 0
    )  # requeued before its first save: step 0
    if checkpoint is not None:
        saved = load_trainer_state(checkpoint)
        # before the weights load: trainer.num_epochs fewer than it has trained
        if saved["step"] > trainer_cfg.max_steps:
            raise CheckpointError(
                f"trainer.resume: checkpoint {checkpoint} is at step {saved['step']}, past this run's "
                f"trainer.max_steps={trainer_cfg.max_steps}; resume with a length that includes it"
            )
        run.engine.load(checkpoint)
        if run.reference_sync is not None:  # a moving reference: its weights as the checkpoint's step left them
            run.reference_sync.load(checkpoint)
        state.step, state.resumed_from, state.tracker_rows = saved["step"], checkpoint, saved.get("tracker_rows")
        state.first_eval, state.first_greedy = saved["first_eval"], saved["first_greedy_accuracy"]
        state.first_dynamics = saved["first_dynamics"]
        if saved.get("token_baseline") is not None:
            state.token_baseline = ProbeTokens.from_state(saved["token_baseline"])
        elif run.probes is not None and cfg.dynamics.token_views:
            log.warning(
                "the checkpoint holds no step-0 token views (saved with dynamics.token_views=false or before them): "
                "the token views' deltas and gains start from the first probe evaluation after this resume"
            )
        state.sampler = training_sampler(run.data.train, trainer_cfg, dist.world_size, saved["sampler"])
        restore_rng_states(saved["rng"])
        log.info("resumed from %s at step %d", checkpoint, state.step)
        # other data than the checkpoint trained on: refused (the parent checked too), or allowed and recorded
        changed = check_resume_data(saved.get("data"), state.data_record, checkpoint, trainer_cfg.resume_data_changed)
        state.data_record["changed_at_steps"] = [
            *(saved.get("data") or {}).get("changed_at_steps", []),
            *([state.step] if changed else []),
        ]
        if changed:
            log.warning(
                "resumed at step %d on changed data (%s=allow): %s", state.step, OVERRIDE_KEY, "; ".join(changed)
            )
    if dist.is_main:
        write_data_record(run_dir / DATA_FILE, state.data_record)
    return state


def save_training(run: BuiltRun, state: TrainState, step: int) -> None:
    """Checkpoint the state after `step` (state.completed is updated at the end of every step)."""
    if run.dist.minimum(float(run.engine.parameters_finite())) < 1.0:  # any rank's partition
        raise NonFiniteTrainingError(
            f"the weights are not finite after step {step}: no checkpoint is written "
            f"(the last one on disk is intact); lower trainer.lr"
        )
    save_checkpoint(
        run.run_dir,
        step,
        run.engine,
        run.tokenizer,
        state.checkpoint_contents(step, dict(run.tracker.rows), run.evaluator.token_baseline),
        run.dist,
        run.cfg,
        keep=run.cfg.trainer.save_total_limit,
        protect=state.resumed_from,
        write_extra=run.reference_sync.save if run.reference_sync is not None else None,
    )
