"""DPO and the losses that only change how the logit h is scored: cDPO, robust DPO, SLiC hinge.

h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), on summed log-probs; with
loss.f_divergence other than reverse_kl, h is the difference of f-divergence scores (scores.py).
Rewards: beta * log(pi / pi_ref) of chosen and rejected.
"""

from dataclasses import dataclass

import torch.nn.functional as F

from prefopt.losses.hyperparameters import Hyperparameters, hyperparameter
from prefopt.losses.registry import LossInputs, LossTerms, implicit_rewards, register
from prefopt.losses.scores import f_alpha_field, f_divergence_field, f_margin


@dataclass(frozen=True)
class DPOParams(Hyperparameters):
    beta: float = hyperparameter(0.1, gt=0)
    label_smoothing: float = hyperparameter(0.0, ge=0, lt=0.5)
    f_divergence: str = f_divergence_field()
    f_alpha: float = f_alpha_field()


@dataclass(frozen=True)
class ConservativeDPOParams(DPOParams):
    label_smoothing: float = hyperparameter(0.1, ge=0, lt=0.5)


@dataclass(frozen=True)
class RobustDPOParams(DPOParams):
    label_smoothing: float = hyperparameter(0.1, ge=0, lt=0.5)


@dataclass(frozen=True)
class HingeParams(Hyperparameters):
    beta: float = hyperparameter(0.1, gt=0)
    f_divergence: str = f_divergence_field()
    f_alpha: float = f_alpha_field()


@register("cdpo", params=ConservativeDPOParams, needs_reference=True)
@register("dpo", params=DPOParams, needs_reference=True)
def dpo_loss(inputs: LossInputs, params: DPOParams) -> LossTerms:
    """DPO, and conservative DPO when label_smoothing eps > 0:

        loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)

    eps = 0 is DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290);
    eps > 0 is cDPO, the loss under labels flipped with probability eps (Mitchell 2023, "A note on
    DPO with noisy preferences and relationship to IPO"). `cdpo` is this function with eps = 0.1.
    TRL 0.2x's sigmoid applied label_smoothing the same way; TRL 1.x's sigmoid ignores it (no cDPO there).
    """
    logits = params.beta * f_margin(inputs, params)
    eps = params.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))


@register("robust_dpo", params=RobustDPOParams, needs_reference=True)
def robust_dpo_loss(inputs: LossInputs, params: RobustDPOParams) -> LossTerms:
    """Robust DPO: the unbiased loss under labels flipped with probability eps = label_smoothing:

        loss = (-(1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h)) / (1 - 2 * eps)

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    arXiv:2403.00409. eps = 0 is DPO.
    """
    logits = params.beta * f_margin(inputs, params)
    eps = params.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))


@register("hinge", params=HingeParams, needs_reference=True)
def hinge_loss(inputs: LossInputs, params: HingeParams) -> LossTerms:
    """SLiC hinge loss on the DPO logit:

        loss = relu(1 - beta * h)

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    arXiv:2305.10425 (with the reference log-ratio, as in the DPO reference code).
    """
    losses = F.relu(1 - params.beta * f_margin(inputs, params))
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))
