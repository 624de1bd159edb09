"""The loss zoo: DPO-family preference losses, SFT, and the Gate-DPO gate that composes with them.

    out = preference_loss("dpo", policy_chosen_logps=..., ..., gate={"kind": "seq"}, beta=0.1)

Each loss is one function in one module of this package, registered under its config name (see
registry.py); `conf/loss/<name>.yaml` holds its defaults. The caller always passes summed log-probs
and lengths; a loss that reads mean token log-probs says so at registration and is given them.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from prefopt.core.errors import ConfigError

# importing a loss module registers its losses; this order is the order of LOSSES and of the docs
from prefopt.losses import (  # noqa: F401
    aot,
    cal_dpo,
    dpo,
    dpo_variants,
    ipo,
    lpo,
    margin_losses,
    orpo,
    per_response,
    sft,
    simpo,
)
from prefopt.losses.gate import GateParams, apply_gate, gate_metrics, parse_gate
from prefopt.losses.registry import LossInputs, LossSpec, LossTerms, get_loss, registered_names
from prefopt.losses.reweight import (
    ReweightParams,
    length_desensitized,
    parse_reweight,
    shared_lengths,
    shared_sums,
    wpo_weights,
)
from prefopt.losses.weighted import WEIGHTED, LossPlan, loss_plan

LOSSES = registered_names()

__all__ = [
    "LOSSES",
    "GateParams",
    "LossInputs",
    "LossOutput",
    "LossPlan",
    "LossSpec",
    "LossTerms",
    "WEIGHTED",
    "get_loss",
    "loss_plan",
    "loss_plan_of",
    "preference_loss",
    "validate_loss_config",
]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, mean over the batch
    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,), detached
    rejected_rewards: torch.Tensor  # (B,), detached
    metrics: Dict[str, float]  # gate/* when gated, plus loss-specific values, averaged over the batch
    gates: Optional[torch.Tensor] = None  # (B,) per-example gate when gated (kind token: the mean over its tokens)
    term_losses: Dict[str, torch.Tensor] = field(default_factory=dict)  # weighted loss: each term's (B,), unweighted


def preference_loss(
    name: str,
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: Optional[torch.Tensor] = None,
    reference_rejected_logps: Optional[torch.Tensor] = None,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    chosen_token_logps: Optional[torch.Tensor] = None,
    chosen_mask: Optional[torch.Tensor] = None,
    rejected_token_logps: Optional[torch.Tensor] = None,
    rejected_mask: Optional[torch.Tensor] = None,
    gate: Any = None,
    reweight: Any = None,
    reference_chosen_shared: Optional[torch.Tensor] = None,
    reference_rejected_shared: Optional[torch.Tensor] = None,
    chosen_log_sum_sq: Optional[torch.Tensor] = None,
    rejected_log_sum_sq: Optional[torch.Tensor] = None,
    progress: float = 0.0,
    **hyperparameters: Any,
) -> LossOutput:
    """Loss `name` on one batch of pairs.

    Log-probs are (B,) sums over response tokens; lengths (B,) response token counts; token log-probs
    and masks (B, T) (mask 1.0 on response tokens) are needed only by the q10 and token gates.
    gate: None, or a dict / DictConfig like {"kind": "seq", "alpha": 50, "tau": 0.05}.
    reweight: None, or loss.reweight's {ld_alpha, wpo} (reweight.py). LD-DPO (ld_alpha < 1) needs the token
    log-probs and masks and, with a reference, its sums over each pair's shared length (reference_*_shared);
    WPO needs the policy's log sum_v pi(v)^2 at each response token (*_log_sum_sq, (B, T)).
    progress: training progress in [0, 1], for scheduled losses. hyperparameters: named as in
    conf/loss/<name>.yaml; missing ones take the defaults. Bad names or values raise ConfigError.
    """
    plan = loss_plan(name, hyperparameters)
    gate_params = parse_gate(gate, plan)
    reweight_params = parse_reweight(OmegaConf.to_container(reweight) if isinstance(reweight, DictConfig) else reweight)
    check_reweight(reweight_params, gate_params, plan)
    if plan.needs_reference and (reference_chosen_logps is None or reference_rejected_logps is None):
        raise ValueError(f"loss {name!r} needs reference_chosen_logps and reference_rejected_logps")
    # a response cut to zero tokens by truncation would divide by zero when averaging
    chosen_lengths = chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
    rejected_lengths = rejected_lengths.to(policy_rejected_logps.dtype).clamp(min=1)

    metrics: Dict[str, torch.Tensor] = {}
    example_gates = None
    plain_rejected_logps = policy_rejected_logps  # the gate estimates the rejected response's probability from it
    if reweight_params.length_desensitized:
        shared = shared_lengths(chosen_mask, rejected_mask)
        alpha = reweight_params.ld_alpha
        policy_chosen_logps = length_desensitized(
            policy_chosen_logps, shared_sums(chosen_token_logps, chosen_mask, shared), alpha
        )
        policy_rejected_logps = length_desensitized(
            policy_rejected_logps, shared_sums(rejected_token_logps, rejected_mask, shared), alpha
        )
        if plan.needs_reference:
            if reference_chosen_shared is None or reference_rejected_shared is None:
                raise ValueError("loss.reweight.ld_alpha needs reference_chosen_shared and reference_rejected_shared")
            reference_chosen_logps = length_desensitized(reference_chosen_logps, reference_chosen_shared, alpha)
            reference_rejected_logps = length_desensitized(reference_rejected_logps, reference_rejected_shared, alpha)
    if gate_params is not None:  # once, before the terms: every term that reads the rejected log-probs is gated
        policy_rejected_logps, gates = apply_gate(
            gate_params,
            policy_rejected_logps,
            rejected_lengths,
            rejected_token_logps,
            rejected_mask,
            estimate_from=plain_rejected_logps,
        )
        metrics.update(gate_metrics(gates))
        example_gates = per_example_gates(gate_params, gates, rejected_mask)

    summed = LossInputs(
        policy_chosen=policy_chosen_logps,
        policy_rejected=policy_rejected_logps,
        reference_chosen=reference_chosen_logps if plan.needs_reference else None,
        reference_rejected=reference_rejected_logps if plan.needs_reference else None,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        progress=float(progress),
    )
    pair_weights = None
    if reweight_params.wpo:
        if chosen_log_sum_sq is None or rejected_log_sum_sq is None:
            raise ValueError("loss.reweight.wpo needs chosen_log_sum_sq and rejected_log_sum_sq")
        pair_weights = wpo_weights(
            chosen_token_logps, chosen_mask, chosen_log_sum_sq, rejected_token_logps, rejected_mask, rejected_log_sum_sq
        )
        metrics["wpo/weight"] = pair_weights.detach().mean()
    outputs = []
    for term in plan.terms:
        inputs = summed.length_averaged() if term.spec.uses_length_average(term.params) else summed
        terms = term.spec.fn(inputs, term.params)
        if pair_weights is not None:  # each term's per-pair loss, as TRL weights each loss type's
            terms.losses = terms.losses * pair_weights
        metrics.update(
            {term_metric(plan, term.name, key): value.detach().mean() for key, value in terms.metrics.items()}
        )
        outputs.append(terms)
    losses = sum(term.weight * terms.losses for term, terms in zip(plan.terms, outputs))
    rewards = outputs[rewards_term(plan)]

    # one device-to-host copy for all metrics, not one sync per value
    values = torch.stack([value.to(torch.float64) for value in metrics.values()]).tolist() if metrics else []
    return LossOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=rewards.chosen_rewards,
        rejected_rewards=rewards.rejected_rewards,
        metrics=dict(zip(metrics, values)),
        gates=example_gates,
        term_losses=(
            {term.name: terms.losses.detach() for term, terms in zip(plan.terms, outputs)} if plan.weighted else {}
        ),
    )


SORTING_LOSSES = ("aot", "aot_unpaired")  # their per-example losses belong to sorted positions, not to pairs


def check_reweight(reweight: ReweightParams, gate: Optional[GateParams], plan: LossPlan) -> None:
    """Refuse what does not combine, naming both keys. The token gate rebuilds the rejected sum token by token with
    each token's gate as its gradient weight, while LD-DPO weights the same tokens by alpha past the shared length.
    WPO weights each pair's loss, which AOT's sorted losses do not have (TRL refuses it there too)."""
    sorting = [term.name for term in plan.terms if term.name in SORTING_LOSSES]
    if reweight.wpo and sorting:
        raise ConfigError(
            f"loss.reweight.wpo=true with loss {sorting[0]!r}: its losses belong to sorted positions, not to pairs, "
            "so there is no pair to weight; set loss.reweight.wpo=false"
        )
    if gate is not None and gate.kind == "token" and reweight.length_desensitized:
        raise ConfigError(
            f"loss.gate.kind=token with loss.reweight.ld_alpha={reweight.ld_alpha:g}: the token gate and LD-DPO each "
            "weight the rejected tokens and are not combined; use loss.gate.kind=seq or q10, or ld_alpha=1"
        )


def term_metric(plan: LossPlan, term: str, key: str) -> str:
    """A loss metric's name: as the loss names it (lpo/linear), which in a weighted run must say its term."""
    return key if not plan.weighted or key.startswith(f"{term}/") else f"{term}/{key}"


def rewards_term(plan: LossPlan) -> int:
    """Which term's rewards a weighted run logs: the first with a reference (beta * log-ratio, comparable across
    DPO-family runs), else the first term."""
    return next((index for index, term in enumerate(plan.terms) if term.spec.needs_reference), 0)


def per_example_gates(
    gate_params: GateParams, gates: torch.Tensor, rejected_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """(B,) gate values: kind token returns one gate per response token (flattened), averaged here per example."""
    if gate_params.kind != "token":
        return gates.detach()
    response = rejected_mask > 0
    token_gates = torch.zeros(response.shape, dtype=gates.dtype, device=gates.device)
    token_gates[response] = gates.detach()
    return token_gates.sum(-1) / response.sum(-1).clamp(min=1)


def validate_loss_config(loss_cfg: Any) -> None:
    """Raise ConfigError, naming the key, if the `loss` node (name, gate, hyperparameters) cannot work."""
    if isinstance(loss_cfg, DictConfig):
        loss_cfg = OmegaConf.to_container(loss_cfg, resolve=True)
    if not isinstance(loss_cfg, Mapping):
        raise ConfigError(f"loss={loss_cfg!r} must be a mapping with a name, e.g. loss=dpo")
    values = dict(loss_cfg)
    if values.get("name") is None:
        raise ConfigError(f"loss.name is missing; choose one of: {', '.join(LOSSES)}")
    name = values.pop("name")
    gate = values.pop("gate", None)
    reweight = parse_reweight(values.pop("reweight", None))
    plan = loss_plan(name, values)
    check_reweight(reweight, parse_gate(gate, plan), plan)


def loss_plan_of(loss_cfg: DictConfig) -> LossPlan:
    """The plan of a composed `loss` node (its name, terms and hyperparameters; the gate is the step's own)."""
    values = OmegaConf.to_container(loss_cfg, resolve=True)
    values.pop("gate", None)
    values.pop("reweight", None)
    return loss_plan(values.pop("name"), values)
