"""Supervised fine-tuning as a loss: the mean token NLL of the chosen response (sft), or of both
responses (sft_extend). Reference-free, no hyperparameters. Rewards: mean token log-probs."""

from dataclasses import dataclass

from prefopt.losses.hyperparameters import Hyperparameters
from prefopt.losses.registry import LossInputs, LossTerms, register


@dataclass(frozen=True)
class NoHyperparameters(Hyperparameters):
    pass


@register("sft", params=NoHyperparameters, needs_reference=False, has_rejected_term=False, length_averaged=True)
def sft_loss(inputs: LossInputs, params: NoHyperparameters) -> LossTerms:
    """SFT on the chosen response:

    loss = -log pi(y_w)/|y_w|
    """
    return LossTerms(-inputs.policy_chosen, inputs.policy_chosen.detach(), inputs.policy_rejected.detach())


@register("sft_extend", params=NoHyperparameters, needs_reference=False, length_averaged=True)
def sft_extend_loss(inputs: LossInputs, params: NoHyperparameters) -> LossTerms:
    """Extended SFT on both responses, so the rejected one does not start preference training in a
    probability valley (where its negative gradient squeezes mass onto the likeliest tokens):

        loss = -(log pi(y_w)/|y_w| + log pi(y_l)/|y_l|) / 2

    Ren & Sutherland 2025, "Learning Dynamics of LLM Finetuning", arXiv:2407.10490 (ICLR 2025).
    """
    losses = -(inputs.policy_chosen + inputs.policy_rejected) / 2
    return LossTerms(losses, inputs.policy_chosen.detach(), inputs.policy_rejected.detach())
