"""Losses of the DPO logit h that change its link function or its normalization: EXO, DiscoPOP, and
DPO on length-normalized log-ratios (TRL's sigmoid_norm).

h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), or the difference of
f-divergence scores with loss.f_divergence (scores.py). Rewards: beta * log(pi / pi_ref).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.losses.hyperparameters import Hyperparameters, hyperparameter
from prefopt.losses.registry import LossInputs, LossTerms, implicit_rewards, register
from prefopt.losses.scores import f_alpha_field, f_divergence_field, f_margin


@dataclass(frozen=True)
class EXOParams(Hyperparameters):
    beta: float = hyperparameter(0.1, gt=0)
    label_smoothing: float = hyperparameter(1e-3, gt=0, lt=0.5)
    f_divergence: str = f_divergence_field()
    f_alpha: float = f_alpha_field()


@dataclass(frozen=True)
class DiscoPOPParams(Hyperparameters):
    beta: float = hyperparameter(0.1, gt=0)
    tau: float = hyperparameter(0.05, gt=0)
    f_divergence: str = f_divergence_field()
    f_alpha: float = f_alpha_field()


@dataclass(frozen=True)
class DPONormParams(Hyperparameters):
    beta: float = hyperparameter(5.0, gt=0)
    f_divergence: str = f_divergence_field()
    f_alpha: float = f_alpha_field()


@register("exo_pair", params=EXOParams, needs_reference=True)
def exo_pair_loss(inputs: LossInputs, params: EXOParams) -> LossTerms:
    """EXO on pairs: the reverse KL from the model's pairwise preference to the smoothed label,

        q = sigmoid(beta * h),  loss = q * (log q - log(1 - eps)) + (1 - q) * (log(1 - q) - log eps)

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", arXiv:2402.00856
    (EXO-pref, eq. 16, K = 2). eps = label_smoothing > 0 (the paper suggests 1e-3); at h = 0 the loss is
    -log 2 - (log eps + log(1 - eps)) / 2, its minimum 0 is at q = 1 - eps.
    """
    logits = params.beta * f_margin(inputs, params)
    eps = params.label_smoothing
    log_q_chosen, log_q_rejected = F.logsigmoid(logits), F.logsigmoid(-logits)
    losses = log_q_chosen.exp() * (log_q_chosen - math.log1p(-eps)) + log_q_rejected.exp() * (
        log_q_rejected - math.log(eps)
    )
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))


@register("discopop", params=DiscoPOPParams, needs_reference=True)
def discopop_loss(inputs: LossInputs, params: DiscoPOPParams) -> LossTerms:
    """DiscoPOP (the log-ratio modulated loss, LRML), with rho = beta * h:

        w = sigmoid(rho / tau),  loss = (1 - w) * (-logsigmoid(rho)) + w * exp(-rho)

    Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models", arXiv:2406.08414 (eq. 5; tau = 0.05 as recommended there). w * exp(-rho) is evaluated as
    exp(logsigmoid(rho / tau) - rho), so a very negative rho gives 0 * inf nowhere.
    """
    rho = params.beta * f_margin(inputs, params)
    modulation = torch.sigmoid(rho / params.tau)
    exponential_part = torch.exp(F.logsigmoid(rho / params.tau) - rho)
    losses = (1 - modulation) * -F.logsigmoid(rho) + exponential_part
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))


@register("dpo_norm", params=DPONormParams, needs_reference=True, length_averaged=True)
def dpo_norm_loss(inputs: LossInputs, params: DPONormParams) -> LossTerms:
    """DPO on length-normalized log-ratios (TRL 1.x's `sigmoid_norm`), on mean token log-probs:

        loss = -logsigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) / |y_w| - (log pi(y_l) - log pi_ref(y_l)) / |y_l|))

    Unlike SimPO it keeps the reference and has no target margin. Per-token log-ratios are about |y|
    times smaller than summed ones, so beta is larger: 5 as in Tulu 3's length-normalized DPO
    (Lambert et al. 2024, arXiv:2411.15124); TRL's default is its generic 0.1. Rewards: beta * the
    per-token log-ratios (what the loss sees).
    """
    losses = -F.logsigmoid(params.beta * f_margin(inputs, params))
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))
