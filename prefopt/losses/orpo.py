"""ORPO: SFT on the chosen response plus an odds-ratio preference term, reference-free."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.losses.hyperparameters import Hyperparameters, hyperparameter
from prefopt.losses.registry import LossInputs, LossTerms, register

# A mean token log-prob of exactly 0 (probability 1) has infinite odds; cap it just below 0.
_MAX_MEAN_LOGP = -1e-6


@dataclass(frozen=True)
class ORPOParams(Hyperparameters):
    odds_ratio_lambda: float = hyperparameter(0.1, ge=0)


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logps), with log(1 - p) computed without cancellation."""
    a = mean_logps.clamp(max=_MAX_MEAN_LOGP)
    log_one_minus_p = torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))
    return a - log_one_minus_p


@register("orpo", params=ORPOParams, needs_reference=False, length_averaged=True)
def orpo_loss(inputs: LossInputs, params: ORPOParams) -> LossTerms:
    """ORPO, with a = log pi(y)/|y| the mean token log-prob and odds(y) = a - log(1 - exp(a)):

        loss = -a_w - odds_ratio_lambda * logsigmoid(odds(y_w) - odds(y_l))

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv:2403.07691 (the paper's lambda is `odds_ratio_lambda`). Rewards: mean token log-probs.
    """
    chosen_nll = -inputs.policy_chosen
    log_odds_ratio = log_odds(inputs.policy_chosen) - log_odds(inputs.policy_rejected)
    losses = chosen_nll - params.odds_ratio_lambda * F.logsigmoid(log_odds_ratio)
    return LossTerms(
        losses,
        inputs.policy_chosen.detach(),
        inputs.policy_rejected.detach(),
        metrics={"orpo/chosen_nll": chosen_nll, "orpo/log_odds_ratio": log_odds_ratio},
    )
