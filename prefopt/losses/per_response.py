"""Losses that score each response's log-ratio on its own instead of (or beside) the chosen - rejected
difference: NCA, BCO, SPPO (hard labels), APO-zero and APO-down.

r_w = log pi(y_w) - log pi_ref(y_w), r_l likewise, on summed log-probs. An f-divergence does not apply
here: the partition term beta * log Z(x) cancels only in a difference (scores.py).
Rewards: beta * log(pi / pi_ref).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.losses.hyperparameters import Hyperparameters, hyperparameter
from prefopt.losses.registry import LossInputs, LossTerms, implicit_rewards, register


@dataclass(frozen=True)
class BetaParams(Hyperparameters):
    beta: float = hyperparameter(0.1, gt=0)


@register("nca_pair", params=BetaParams, needs_reference=True)
def nca_pair_loss(inputs: LossInputs, params: BetaParams) -> LossTerms:
    """NCA on pairs, with rewards b_w = beta * r_w, b_l = beta * r_l:

        loss = -logsigmoid(b_w) - 0.5 * logsigmoid(-b_w) - 0.5 * logsigmoid(-b_l)

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    arXiv:2402.05369 (the pairwise-preference form). It raises the chosen log-ratio in absolute terms,
    not only relative to the rejected one. At the reference: 2 log 2.
    """
    chosen, rejected = params.beta * inputs.chosen_logratios, params.beta * inputs.rejected_logratios
    losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))


@register("bco_pair", params=BetaParams, needs_reference=True)
def bco_pair_loss(inputs: LossInputs, params: BetaParams) -> LossTerms:
    """BCO on pairs: a binary classifier with the implicit reward as its logit, chosen = 1, rejected = 0:

        loss = -logsigmoid(beta * r_w) - logsigmoid(-beta * r_l)

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
    arXiv:2404.04656. The paper (and TRL 0.2x) shift both logits by delta, a running mean of the batch
    rewards; TRL 1.x drops it and so does this loss: stateless, so nothing to restore on resume and no
    dependence on batch order. At the reference: 2 log 2.
    """
    chosen, rejected = params.beta * inputs.chosen_logratios, params.beta * inputs.rejected_logratios
    losses = -F.logsigmoid(chosen) - F.logsigmoid(-rejected)
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))


@register("sppo_hard", params=BetaParams, needs_reference=True)
def sppo_hard_loss(inputs: LossInputs, params: BetaParams) -> LossTerms:
    """SPPO with hard win probabilities (1 for the chosen, 0 for the rejected response):

        loss = (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", arXiv:2405.00675
    (eq. 4.7 with P(y_w beats pi_t) = 1, P(y_l beats pi_t) = 0; the paper's eta is 1/beta, and the
    current policy of the self-play round is the reference). At the reference: 1/(2 beta^2).
    """
    target = 1 / (2 * params.beta)
    losses = (inputs.chosen_logratios - target) ** 2 + (inputs.rejected_logratios + target) ** 2
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))


@register("apo_zero", params=BetaParams, needs_reference=True)
def apo_zero_loss(inputs: LossInputs, params: BetaParams) -> LossTerms:
    """APO-zero: push the chosen log-ratio up and the rejected one down, each anchored at zero:

        loss = (1 - sigmoid(beta * r_w)) + sigmoid(beta * r_l)

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
    arXiv:2408.06266 (eq. 7): for chosen responses better than the model's own. At the reference: 1.
    """
    losses = (
        1
        - torch.sigmoid(params.beta * inputs.chosen_logratios)
        + torch.sigmoid(params.beta * inputs.rejected_logratios)
    )
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))


@register("apo_down", params=BetaParams, needs_reference=True)
def apo_down_loss(inputs: LossInputs, params: BetaParams) -> LossTerms:
    """APO-down: push the chosen log-ratio down, and the rejected one down further:

        loss = sigmoid(beta * r_w) + (1 - sigmoid(beta * (r_w - r_l)))

    D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions",
    arXiv:2408.06266 (eq. 8): for chosen responses worse than the model's own. At the reference: 1.
    """
    chosen = inputs.chosen_logratios
    losses = torch.sigmoid(params.beta * chosen) + 1 - torch.sigmoid(params.beta * (chosen - inputs.rejected_logratios))
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))
