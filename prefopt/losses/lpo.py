"""LPO: a linear (absolute-value) preference loss whose chosen and rejected gradients are set
separately with a straight-through split, plus a penalty on the chosen log-prob falling below the
reference's."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.losses.hyperparameters import Hyperparameters, hyperparameter
from prefopt.losses.registry import LossInputs, LossTerms, implicit_rewards, register

LPO_VARIANTS = ("ste", "plain", "ste_dynamic")


@dataclass(frozen=True)
class LPOParams(Hyperparameters):
    beta: float = hyperparameter(0.2, gt=0)
    r1: float = hyperparameter(1.0, gt=0)
    r2: float = hyperparameter(0.2, gt=0)
    gamma: float = hyperparameter(10.0, ge=0)
    variant: str = hyperparameter("ste", choices=LPO_VARIANTS)
    length_average: bool = hyperparameter(True)


@register("lpo", params=LPOParams, needs_reference=True, length_averaged="length_average")
def lpo_loss(inputs: LossInputs, params: LPOParams) -> LossTerms:
    """Linear Preference Optimization, with x1 = log pi(y_w) - log pi_ref(y_w), x2 likewise for y_l,
    off = 1/(2 beta) and sg = stop-gradient:

        ste:         loss = 2 beta * (2/(r1+r2)) * (r1 |x1 - sg(x2) - off| + r2 |sg(x1) - x2 - off|)
                            + gamma * relu(-x1)
        plain:       loss = 4 beta * |x1 - x2 - off| + gamma * relu(-x1)
        ste_dynamic: ste with r1 = 1, r2 = exp(sg(x2 - x1))

    Every variant has the forward value 4 beta |x1 - x2 - off| + gamma * relu(-x1); ste only splits the
    gradient, r1 : r2 being the chosen : rejected share. The weights are computed as
    2 r_i/(r1+r2) (a sigmoid for ste_dynamic) so huge log-ratios cannot overflow.
    Wang et al. 2025, "Linear Preference Optimization", arXiv:2508.14947; defaults from the released
    recipe (beta 0.2, r1 1, r2 0.2, gamma 10, length-averaged log-probs). gamma = 0 turns the positive
    term off. Rewards: beta * log(pi / pi_ref) on the same log-probs.
    """
    chosen, rejected = inputs.chosen_logratios, inputs.rejected_logratios
    offset = 1 / (2 * params.beta)
    if params.variant == "plain":
        linear = 4 * params.beta * (chosen - rejected - offset).abs()
    else:
        if params.variant == "ste_dynamic":
            chosen_weight = 2 * torch.sigmoid((chosen - rejected).detach())  # 2 r1/(r1+r2), r1 = 1
            rejected_weight = 2 * torch.sigmoid((rejected - chosen).detach())  # r2 = exp(sg(x2 - x1))
        else:
            chosen_weight = 2 * params.r1 / (params.r1 + params.r2)
            rejected_weight = 2 * params.r2 / (params.r1 + params.r2)
        linear = (
            2
            * params.beta
            * (
                chosen_weight * (chosen - rejected.detach() - offset).abs()
                + rejected_weight * (chosen.detach() - rejected - offset).abs()
            )
        )
    positive_reg = params.gamma * F.relu(-chosen)
    return LossTerms(
        linear + positive_reg,
        *implicit_rewards(inputs, params.beta),
        metrics={"lpo/linear": linear, "lpo/pos_reg": positive_reg},
    )
