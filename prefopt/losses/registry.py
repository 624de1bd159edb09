"""The loss registry: what a loss function sees, what it returns, and how it declares itself.

A loss is a pure function `fn(inputs: LossInputs, params) -> LossTerms`, registered under its config
name with `@register(...)`. The registration says whether the loss needs a reference model, whether
it has a rejected term (so the gate applies), and whether it reads length-averaged log-probs; the
caller (`preference_loss`) does the averaging, so a loss declares it once and never repeats it.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Type, Union

import torch

from prefopt.core.errors import ConfigError
from prefopt.losses.hyperparameters import Hyperparameters


@dataclass(frozen=True)
class LossInputs:
    """Per-example sequence log-probs of a batch of pairs, summed or length-averaged as the loss declared.

    Shapes are (B,). The reference values are None for reference-free losses.
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: Optional[torch.Tensor]
    reference_rejected: Optional[torch.Tensor]
    chosen_lengths: torch.Tensor  # response tokens, >= 1
    rejected_lengths: torch.Tensor
    progress: float = 0.0  # training progress in [0, 1], for scheduled losses
    averaged: bool = False  # True once length_averaged(): the log-probs are mean token log-probs

    def length_averaged(self) -> "LossInputs":
        """The same log-probs divided by the response lengths (mean token log-probs)."""

        def average(logps: Optional[torch.Tensor], lengths: torch.Tensor) -> Optional[torch.Tensor]:
            return None if logps is None else logps / lengths

        return dataclasses.replace(
            self,
            policy_chosen=average(self.policy_chosen, self.chosen_lengths),
            policy_rejected=average(self.policy_rejected, self.rejected_lengths),
            reference_chosen=average(self.reference_chosen, self.chosen_lengths),
            reference_rejected=average(self.reference_rejected, self.rejected_lengths),
            averaged=True,
        )

    @property
    def chosen_logratios(self) -> torch.Tensor:
        """log pi(y_w|x) - log pi_ref(y_w|x)."""
        return self.policy_chosen - self.reference_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        """log pi(y_l|x) - log pi_ref(y_l|x)."""
        return self.policy_rejected - self.reference_rejected

    @property
    def margin(self) -> torch.Tensor:
        """h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)), the DPO logit before beta."""
        return self.chosen_logratios - self.rejected_logratios


@dataclass
class LossTerms:
    """What a loss function returns: per-example losses, detached rewards, per-example metrics."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)  # averaged over the batch for logging


def implicit_rewards(inputs: LossInputs, beta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The DPO implicit rewards beta * log(pi / pi_ref) of chosen and rejected, detached."""
    return (beta * inputs.chosen_logratios).detach(), (beta * inputs.rejected_logratios).detach()


LossFunction = Callable[[LossInputs, Hyperparameters], LossTerms]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function and what the trainer and the docs need to know about it."""

    name: str
    fn: LossFunction
    params: Type[Hyperparameters]  # typed hyperparameters with defaults (equal to conf/loss/<name>.yaml)
    needs_reference: bool  # False: the trainer loads no reference model and passes None
    has_rejected_term: bool  # False: the gate cannot apply
    length_averaged: Union[bool, str]  # True/False, or the name of the bool hyperparameter that decides

    def uses_length_average(self, params: Hyperparameters) -> bool:
        """Whether this loss reads mean token log-probs (True) or summed log-probs (False) under `params`."""
        if isinstance(self.length_averaged, str):
            return getattr(params, self.length_averaged)
        return self.length_averaged

    def describe_length_averaging(self) -> str:
        """For the docs: 'yes', 'no', or which key decides and its default."""
        if isinstance(self.length_averaged, str):
            default = getattr(self.params(), self.length_averaged)
            return f"`{self.length_averaged}` (default {str(default).lower()})"
        return "yes" if self.length_averaged else "no"

    def make_params(self, values: Dict) -> Hyperparameters:
        """Typed, validated hyperparameters from config values; missing keys take the defaults."""
        return self.params.from_config(values, key_prefix="loss.", owner=f"loss '{self.name}'")

    @property
    def formula(self) -> str:
        """The loss function's docstring: formula, paper, choices."""
        return self.fn.__doc__ or ""


_REGISTRY: Dict[str, LossSpec] = {}


def register(
    name: str,
    *,
    params: Type[Hyperparameters],
    needs_reference: bool,
    has_rejected_term: bool = True,
    length_averaged: Union[bool, str] = False,
) -> Callable[[LossFunction], LossFunction]:
    """Register the decorated function as the loss `name` (one function may serve several names)."""

    def decorator(fn: LossFunction) -> LossFunction:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is registered twice")
        if isinstance(length_averaged, str) and length_averaged not in {f.name for f in dataclasses.fields(params)}:
            raise ValueError(f"loss {name!r}: length_averaged names {length_averaged!r}, not a field of {params}")
        _REGISTRY[name] = LossSpec(name, fn, params, needs_reference, has_rejected_term, length_averaged)
        return fn

    return decorator


def registered_names() -> Tuple[str, ...]:
    return tuple(_REGISTRY)


def get_loss(name: str) -> LossSpec:
    """The registered loss `name`; ConfigError naming loss.name if there is none."""
    if name not in _REGISTRY:
        raise ConfigError(f"loss.name={name!r} is not a registered loss; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]
