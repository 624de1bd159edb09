"""f-divergence scores: what replaces the log-ratio log(pi/pi_ref) in the margin-based losses.

DPO's implicit reward beta * log(pi/pi_ref) comes from a reverse-KL penalty to the reference. Under
another f-divergence the reward becomes beta * f'(pi/pi_ref), and since the partition term
beta * log Z(x) cancels only in the chosen - rejected difference, the substitution is valid only for
losses of that difference (dpo, cdpo, robust_dpo, hinge, ipo, exo_pair, discopop, dpo_norm).
Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
Divergence Constraints", arXiv:2309.16240. With u = pi/pi_ref and x = log u:

    reverse_kl  f'(u) = log u                  = x                  (DPO)
    forward_kl  f'(u) = 1 - 1/u                = 1 - exp(-x)
    js          f'(u) = log(2u / (1 + u))      = log 2 + logsigmoid(x)
    alpha       f'(u) = (1 - u^(-a)) / a       = (1 - exp(-a x)) / a,  a = f_alpha in (0, 1]

alpha follows the paper: a -> 0 is reverse KL, a = 1 is forward KL (TRL 1.x writes the same family as
(u^(c-1) - 1)/(c-1), so its f_alpha_divergence_coef c is 1 - a here). The score is taken of the
sequence ratio; a loss on length-averaged log-probs divides the score by the response length, as TRL does.
"""

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from prefopt.losses.hyperparameters import Hyperparameters, hyperparameter
from prefopt.losses.registry import LossInputs

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


def f_divergence_field():
    """The `f_divergence` hyperparameter of a margin-based loss (reverse_kl: the loss as published)."""
    return hyperparameter("reverse_kl", choices=F_DIVERGENCES)


def f_alpha_field():
    """The `f_alpha` hyperparameter: a of the alpha-divergence, read only with f_divergence=alpha."""
    return hyperparameter(0.5, gt=0, le=1)


def f_prime_of_log_ratio(log_ratio: torch.Tensor, f_divergence: str, f_alpha: float) -> torch.Tensor:
    """f'(u) for u = exp(log_ratio), the score of one response."""
    if f_divergence == "reverse_kl":
        return log_ratio
    if f_divergence == "forward_kl":
        return -torch.expm1(-log_ratio)
    if f_divergence == "js":
        return math.log(2) + F.logsigmoid(log_ratio)
    if f_divergence == "alpha":
        return -torch.expm1(-f_alpha * log_ratio) / f_alpha
    raise ValueError(f"unknown f_divergence {f_divergence!r}")


def f_scores(inputs: LossInputs, params: Hyperparameters) -> Tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores f'(pi/pi_ref) under params.f_divergence, per token when the inputs are averaged."""
    if params.f_divergence == "reverse_kl":
        return inputs.chosen_logratios, inputs.rejected_logratios

    def score(log_ratio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if not inputs.averaged:
            return f_prime_of_log_ratio(log_ratio, params.f_divergence, params.f_alpha)
        return f_prime_of_log_ratio(log_ratio * lengths, params.f_divergence, params.f_alpha) / lengths

    chosen = score(inputs.chosen_logratios, inputs.chosen_lengths)
    return chosen, score(inputs.rejected_logratios, inputs.rejected_lengths)


def f_margin(inputs: LossInputs, params: Hyperparameters) -> torch.Tensor:
    """The score difference f'(u_w) - f'(u_l): the DPO logit h when f_divergence is reverse_kl."""
    if params.f_divergence == "reverse_kl":
        return inputs.margin
    chosen, rejected = f_scores(inputs, params)
    return chosen - rejected
