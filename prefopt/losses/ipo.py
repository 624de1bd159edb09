"""IPO: a squared loss that regresses the DPO logit onto a finite target."""

from dataclasses import dataclass

from prefopt.losses.hyperparameters import Hyperparameters, hyperparameter
from prefopt.losses.registry import LossInputs, LossTerms, implicit_rewards, register
from prefopt.losses.scores import f_alpha_field, f_divergence_field, f_margin


@dataclass(frozen=True)
class IPOParams(Hyperparameters):
    beta: float = hyperparameter(0.1, gt=0)
    length_average: bool = hyperparameter(True)
    f_divergence: str = f_divergence_field()
    f_alpha: float = f_alpha_field()


@register("ipo", params=IPOParams, needs_reference=True, length_averaged="length_average")
def ipo_loss(inputs: LossInputs, params: IPOParams) -> LossTerms:
    """IPO:

        loss = (h - 1 / (2 * beta))^2

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv:2310.12036. The paper's h uses summed log-probs; by default (length_average:
    true) h is computed on mean token log-probs of policy and reference, as in the DPO authors' and
    TRL's implementations (0.2x and 1.x alike; LLaMA-Factory's too), because the target 1/(2 beta) is
    otherwise out of scale for long responses; length_average: false sums, as the paper and OpenRLHF do.
    Rewards: beta * log(pi / pi_ref) on the same (averaged or summed) log-probs.
    """
    losses = (f_margin(inputs, params) - 1 / (2 * params.beta)) ** 2
    return LossTerms(losses, *implicit_rewards(inputs, params.beta))
