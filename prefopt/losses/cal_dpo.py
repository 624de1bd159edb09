"""Cal-DPO: DPO's contrastive term plus a calibration of the implicit rewards to a fixed scale."""

from dataclasses import dataclass

import torch.nn.functional as F

from prefopt.losses.hyperparameters import Hyperparameters, hyperparameter
from prefopt.losses.registry import LossInputs, LossTerms, implicit_rewards, register


@dataclass(frozen=True)
class CalDPOParams(Hyperparameters):
    beta: float = hyperparameter(0.1, gt=0)


@register("cal_dpo", params=CalDPOParams, needs_reference=True)
def cal_dpo_loss(inputs: LossInputs, params: CalDPOParams) -> LossTerms:
    """Cal-DPO, with r_w = log pi(y_w) - log pi_ref(y_w) and r_l likewise (summed log-probs):

        loss = -logsigmoid(r_w - r_l) + 0.5 * ((r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2)

    Xiao et al. 2024, "Cal-DPO: Calibrated Direct Preference Optimization for Language Model
    Alignment", arXiv:2412.14516. As in the authors' code there is no beta inside the sigmoid; beta
    only sets the calibration targets +-1/(2 beta). Rewards: beta * log(pi / pi_ref).
    """
    chosen, rejected = inputs.chosen_logratios, inputs.rejected_logratios
    target = 1 / (2 * params.beta)
    calibration = 0.5 * ((chosen - target) ** 2 + (rejected + target) ** 2)
    losses = -F.logsigmoid(chosen - rejected) + calibration
    return LossTerms(losses, *implicit_rewards(inputs, params.beta), metrics={"cal_dpo/calibration": calibration})
