"""DPO with a term that protects the chosen response (DPOP) or down-weights the rejected one (DPO-Shift);
RPO, DPO plus the chosen NLL, is the weighted loss dpo + sft (conf/loss/rpo.yaml).
Summed log-probs; rewards beta * log(pi / pi_ref).
"""

from dataclasses import dataclass

import torch.nn.functional as F

from prefopt.core.errors import ConfigError
from prefopt.losses.hyperparameters import Hyperparameters, hyperparameter, show
from prefopt.losses.registry import LossInputs, LossTerms, implicit_rewards, register


@dataclass(frozen=True)
class DPOPParams(Hyperparameters):
    beta: float = hyperparameter(0.3, gt=0)
    penalty_lambda: float = hyperparameter(50.0, ge=0)


SHIFT_SCHEDULES = ("fixed", "increase", "decrease")


@dataclass(frozen=True)
class DPOShiftParams(Hyperparameters):
    beta: float = hyperparameter(0.1, gt=0)
    shift_schedule: str = hyperparameter("fixed", choices=SHIFT_SCHEDULES)
    f: float = hyperparameter(0.95, gt=0, le=1)
    f_min: float = hyperparameter(0.75, gt=0, le=1)
    f_max: float = hyperparameter(0.95, gt=0, le=1)

    def check_combination(self, key_prefix: str) -> None:
        if self.f_min > self.f_max:
            raise ConfigError(f"{key_prefix}f_min={show(self.f_min)} must be <= {key_prefix}f_max={show(self.f_max)}")

    def shift(self, progress: float) -> float:
        """The factor f on the rejected log-ratio at training progress in [0, 1]."""
        progress = min(max(progress, 0.0), 1.0)
        if self.shift_schedule == "increase":
            return self.f_min + (self.f_max - self.f_min) * progress
        if self.shift_schedule == "decrease":
            return self.f_max - (self.f_max - self.f_min) * progress
        return self.f


@register("dpop", params=DPOPParams, needs_reference=True)
def dpop_loss(inputs: LossInputs, params: DPOPParams) -> LossTerms:
    """DPO-Positive: penalize the chosen log-prob falling below the reference's:

        loss = -logsigmoid(beta * (h - penalty_lambda * relu(log pi_ref(y_w) - log pi(y_w))))

    Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive",
    arXiv:2402.13228 (the paper's lambda is `penalty_lambda`).
    """
    penalty = F.relu(-inputs.chosen_logratios)
    losses = -F.logsigmoid(params.beta * (inputs.margin - params.penalty_lambda * penalty))
    return LossTerms(losses, *implicit_rewards(inputs, params.beta), metrics={"dpop/penalty": penalty})


@register("dpo_shift", params=DPOShiftParams, needs_reference=True)
def dpo_shift_loss(inputs: LossInputs, params: DPOShiftParams) -> LossTerms:
    """DPO-Shift: scale the rejected log-ratio by f <= 1 (fixed, or linear in training progress):

        loss = -logsigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - f * (log pi(y_l) - log pi_ref(y_l))))

    increase: f = f_min + (f_max - f_min) * progress; decrease: f = f_max - (f_max - f_min) * progress.
    Yang et al. 2025, "DPO-Shift: Shifting the Distribution of Direct Preference Optimization",
    arXiv:2502.07599. Rewards are the unscaled beta * log(pi / pi_ref).
    """
    f = params.shift(inputs.progress)
    losses = -F.logsigmoid(params.beta * (inputs.chosen_logratios - f * inputs.rejected_logratios))
    return LossTerms(losses, *implicit_rewards(inputs, params.beta), metrics={"dpo_shift/f": losses.new_tensor(f)})
