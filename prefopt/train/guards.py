"""What the training loop watches so that a run never goes on silently wrong: non-finite steps are
skipped and counted, too many in a row stop the run, and a gradient norm stuck at exactly 0 warns.

A step is skipped (its update not applied, see engine.step) when a micro batch's loss or the gradient
norm is not finite. `trainer.max_skipped_steps` consecutive skips end the run with a
NonFiniteTrainingError; checkpoints are only written from finite weights, so the last one stays valid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prefopt.core.errors import NonFiniteTrainingError

log = logging.getLogger("prefopt")

ZERO_NORM_STEPS_TO_WARN = 3  # consecutive steps with a gradient norm of exactly 0 before the (one) warning


@dataclass
class StepGuard:
    max_consecutive_skips: int
    skipped_steps: int = 0  # over the whole run (logged as train/skipped_steps)
    consecutive_skips: int = 0
    zero_norm_steps: int = 0
    warned_zero_norm: bool = False

    def after_step(self, step: int, applied: bool, grad_norm: float) -> None:
        if applied:
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            log.warning(
                "step %d: non-finite loss or gradient norm (%s); the update was skipped (%d in a row, %d in all)",
                step,
                grad_norm,
                self.consecutive_skips,
                self.skipped_steps,
            )
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise NonFiniteTrainingError(
                    f"{self.consecutive_skips} consecutive steps up to step {step} had a non-finite loss or gradient "
                    f"norm (trainer.max_skipped_steps={self.max_consecutive_skips}); the run stops and its last "
                    f"checkpoint (if any) holds finite weights. Lower trainer.lr, keep trainer.max_grad_norm > 0, "
                    f"or check the data for extreme pairs"
                )
        self.zero_norm_steps = self.zero_norm_steps + 1 if applied and grad_norm == 0.0 else 0
        if self.zero_norm_steps >= ZERO_NORM_STEPS_TO_WARN and not self.warned_zero_norm:
            self.warned_zero_norm = True
            log.warning(
                "the gradient norm has been exactly 0 for %d steps (up to step %d): nothing is training. "
                "Saturated losses or an overflowed model give this; check trainer.lr and the loss's scale",
                self.zero_norm_steps,
                step,
            )
