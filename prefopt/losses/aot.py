"""AOT: alignment via optimal transport, a distributional preference loss over the batch.

Instead of asking each pair's margin to be positive, AOT asks the distribution of chosen rewards to
dominate that of rejected rewards (first-order stochastic dominance); for one-dimensional samples the
optimal transport plan matches sorted values, so the loss compares the batch's sorted quantities.
Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
arXiv:2406.05882. Summed log-probs; rewards beta * log(pi / pi_ref).

The sort runs over the batch the loss sees: one micro-batch on one rank, as TRL sorts its per-device
batch. The value therefore depends on trainer.micro_batch_size (and splitting a batch over ranks or
accumulation steps changes it), and `losses[i]` belongs to the i-th sorted position, not to pair i.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.losses.hyperparameters import Hyperparameters, hyperparameter
from prefopt.losses.registry import LossInputs, LossTerms, implicit_rewards, register


@dataclass(frozen=True)
class AOTParams(Hyperparameters):
    beta: float = hyperparameter(0.1, gt=0)
    label_smoothing: float = hyperparameter(0.0, ge=0, lt=0.5)


def smoothed_logistic(delta: torch.Tensor, params: AOTParams) -> torch.Tensor:
    """-(1 - eps) * logsigmoid(beta * delta) - eps * logsigmoid(-beta * delta), eps = label_smoothing."""
    eps = params.label_smoothing
    return -(1 - eps) * F.logsigmoid(params.beta * delta) - eps * F.logsigmoid(-params.beta * delta)


def sorted_over_batch(values: torch.Tensor) -> torch.Tensor:
    return torch.sort(values, dim=0).values


@register("aot", params=AOTParams, needs_reference=True)
def aot_loss(inputs: LossInputs, params: AOTParams) -> LossTerms:
    """AOT on paired data: the policy's chosen - rejected log-prob gaps, sorted over the batch, against
    the reference's gaps sorted alike:

        delta_(i) = sort(log pi(y_w) - log pi(y_l))_(i) - sort(log pi_ref(y_w) - log pi_ref(y_l))_(i)
        loss_(i) = -(1 - eps) * logsigmoid(beta * delta_(i)) - eps * logsigmoid(-beta * delta_(i))
    """
    policy_gaps = sorted_over_batch(inputs.policy_chosen - inputs.policy_rejected)
    reference_gaps = sorted_over_batch(inputs.reference_chosen - inputs.reference_rejected)
    losses = smoothed_logistic(policy_gaps - reference_gaps, params)
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))


@register("aot_unpaired", params=AOTParams, needs_reference=True)
def aot_unpaired_loss(inputs: LossInputs, params: AOTParams) -> LossTerms:
    """AOT on unpaired data: chosen and rejected log-ratios sorted over the batch separately:

        delta_(i) = sort(log pi(y_w) - log pi_ref(y_w))_(i) - sort(log pi(y_l) - log pi_ref(y_l))_(i)
        loss_(i) = -(1 - eps) * logsigmoid(beta * delta_(i)) - eps * logsigmoid(-beta * delta_(i))

    TRL 0.2x named this `aot_pair`; TRL 1.x names it `aot_unpaired`.
    """
    delta = sorted_over_batch(inputs.chosen_logratios) - sorted_over_batch(inputs.rejected_logratios)
    losses = smoothed_logistic(delta, params)
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))
