"""SimPO: a reference-free margin loss on mean token log-probs."""

from dataclasses import dataclass

import torch.nn.functional as F

from prefopt.losses.hyperparameters import Hyperparameters, hyperparameter
from prefopt.losses.registry import LossInputs, LossTerms, register


@dataclass(frozen=True)
class SimPOParams(Hyperparameters):
    beta: float = hyperparameter(2.0, gt=0)
    gamma: float = hyperparameter(1.6, ge=0)


@register("simpo", params=SimPOParams, needs_reference=False, length_averaged=True)
def simpo_loss(inputs: LossInputs, params: SimPOParams) -> LossTerms:
    """SimPO, on mean token log-probs (log pi(y)/|y|):

        loss = -logsigmoid(beta * (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma)

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734 (gamma is the target margin itself, not the gamma/beta ratio of the authors'
    code). Rewards: beta * mean token log-prob.
    """
    chosen_rewards, rejected_rewards = params.beta * inputs.policy_chosen, params.beta * inputs.policy_rejected
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - params.gamma)
    return LossTerms(losses, chosen_rewards.detach(), rejected_rewards.detach())
