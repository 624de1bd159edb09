"""Weighted multi-loss runs: a loss made of registered losses ("terms"), each with a weight and its own
hyperparameters, whose per-example loss is the weighted sum

    loss = sum_k w_k * loss_k

as TRL 1.x's `loss_type=[...]` with `loss_weights=[...]` (its MPO example: sigmoid 0.8 + bco_pair 0.2 +
sft 1.0, conf/loss/mpo.yaml). Each term sees the log-probs its own registration asks for (summed or
length-averaged) and is logged on its own (train|eval/loss/<term>, unweighted, beside the weighted sum),
which TRL does not do. The gate scales the gradient through the rejected log-probs once, before the terms,
so it reaches every term that reads them; a run whose terms have no rejected term refuses it.

A single loss is the plan of one term with weight 1: the trainer builds every loss through `loss_plan`.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

from prefopt.core.errors import ConfigError
from prefopt.losses.hyperparameters import Hyperparameters
from prefopt.losses.registry import LossSpec, get_loss, registered_names

WEIGHTED = "weighted"  # loss.name of a weighted sum; its terms are in loss.terms


@dataclass(frozen=True)
class LossTerm:
    """One registered loss inside a plan, with its weight and typed hyperparameters."""

    name: str
    weight: float
    spec: LossSpec
    params: Hyperparameters


@dataclass(frozen=True)
class LossPlan:
    """What the trainer runs as its loss: one term (loss.name=dpo) or several (loss.name=weighted)."""

    name: str
    terms: Tuple[LossTerm, ...]

    @property
    def needs_reference(self) -> bool:
        """A reference model (or precomputed pass) is needed when any term reads one."""
        return any(term.spec.needs_reference for term in self.terms)

    @property
    def has_rejected_term(self) -> bool:
        """The gate can apply when any term reads the rejected log-probs."""
        return any(term.spec.has_rejected_term for term in self.terms)

    @property
    def weighted(self) -> bool:
        return self.name == WEIGHTED


def loss_plan(name: str, hyperparameters: Mapping[str, Any]) -> LossPlan:
    """The plan for loss `name` with config values `hyperparameters` (without name and gate); ConfigError naming
    the key when a term, weight or hyperparameter is wrong."""
    if name != WEIGHTED:
        spec = get_loss(name)
        return LossPlan(name, (LossTerm(name, 1.0, spec, spec.make_params(dict(hyperparameters))),))
    values = dict(hyperparameters)
    terms = values.pop("terms", None)
    if values:
        raise ConfigError(
            f"loss.{next(iter(values))} is not a key of loss 'weighted': put each term's hyperparameters under "
            "loss.terms.<term>, e.g. loss.terms.dpo.beta=0.1"
        )
    if not isinstance(terms, Mapping) or not terms:
        raise ConfigError(
            "loss.terms must map each term to its weight and hyperparameters, "
            "e.g. loss.terms={dpo: {weight: 0.8}, sft: {weight: 1.0}} (see conf/loss/mpo.yaml)"
        )
    return LossPlan(WEIGHTED, tuple(weighted_term(str(term), settings) for term, settings in terms.items()))


def weighted_term(name: str, settings: Any) -> LossTerm:
    """loss.terms.<name>: {weight: w, <hyperparameter>: value, ...} as a LossTerm."""
    key = f"loss.terms.{name}"
    if name == WEIGHTED or name not in registered_names():
        choices = ", ".join(registered_names())
        raise ConfigError(f"{key}: {name!r} is not a registered loss; choose terms among: {choices}")
    if not isinstance(settings, Mapping) or "weight" not in settings:
        raise ConfigError(f"{key} must be a mapping with a weight, e.g. {key}={{weight: 1.0}}")
    values: Dict[str, Any] = dict(settings)
    weight = values.pop("weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"{key}.weight={weight!r} must be a number > 0 (drop the term to leave it out)")
    spec = get_loss(name)
    params = spec.params.from_config(values, key_prefix=f"{key}.", owner=f"loss '{name}'")
    return LossTerm(name, float(weight), spec, params)
