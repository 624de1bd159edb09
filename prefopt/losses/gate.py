"""Gate-DPO: a gate on the gradient that flows through the rejected log-probs.

Per example, g = sigmoid(alpha * (p - tau)) with p an estimate of the rejected response's
probability, computed without gradient. The policy's rejected log-prob x enters the loss as

    sg(x) + g * (x - sg(x))          (= g * x + (1 - g) * sg(x), sg = stop-gradient)

so the loss value is unchanged and only the gradient through x is scaled, by g. The gate is applied
to the rejected log-probs before the loss sees them, so it reaches every place they appear (Cal-DPO's
calibration term included). Why: a negative gradient on a rejected response that already sits in a
probability valley mostly squeezes mass onto the likeliest tokens (and drags the chosen response
down with it); the gate switches that gradient off there and leaves it alone elsewhere.

Estimators of p (`kind`):
    seq    exp(mean token log-prob), the geometric-mean token probability
    q10    the `quantile` (default 0.1) of the response's token probabilities, over masked positions
    log    g = sigmoid(kappa * (log p - log tau)) with p the seq estimate (scale-free in p)
    token  a gate per token, g_t = sigmoid(alpha * (p_t - tau)) on each token's log-prob, re-summed
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.losses.hyperparameters import Hyperparameters, hyperparameter
from prefopt.losses.registry import LossSpec
from prefopt.losses.weighted import LossPlan

GATE_KINDS = ("none", "seq", "q10", "log", "token")


@dataclass(frozen=True)
class GateParams(Hyperparameters):
    kind: str = hyperparameter("none", choices=GATE_KINDS)
    alpha: float = hyperparameter(50.0, ge=0)
    tau: float = hyperparameter(0.05, gt=0, lt=1)
    quantile: float = hyperparameter(0.1, gt=0, lt=1)
    kappa: float = hyperparameter(3.0, ge=0)


def parse_gate(gate: Any, spec: LossSpec | LossPlan) -> Optional[GateParams]:
    """The gate settings from a dict / DictConfig / None; None when there is no gate (kind none). `spec`: the loss
    (a registered loss or a weighted plan), which must have a rejected term for a gate."""
    if gate is None:
        return None
    if isinstance(gate, DictConfig):
        gate = OmegaConf.to_container(gate, resolve=True)
    if not isinstance(gate, dict):
        raise ConfigError(f"loss.gate={gate!r} must be a mapping like {{kind: seq, alpha: 50, tau: 0.05}}")
    params = GateParams.from_config(gate, key_prefix="loss.gate.", owner="the gate")
    if params.kind == "none":
        return None
    if not spec.has_rejected_term:
        raise ConfigError(
            f"loss.gate.kind={params.kind!r} cannot apply to loss '{spec.name}': it has no rejected term; "
            "set loss.gate.kind=none"
        )
    return params


def scale_gradient(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`values` unchanged, with the gradient through them multiplied by `scale` (detached)."""
    return values.detach() + scale * (values - values.detach())


def _compute_dtype(values: torch.Tensor) -> torch.dtype:
    """float64 stays float64; half precision is promoted so exp() and the quantile are accurate."""
    return torch.float64 if values.dtype == torch.float64 else torch.float32


def apply_gate(
    gate: GateParams,
    rejected_logps: torch.Tensor,
    rejected_lengths: torch.Tensor,
    rejected_token_logps: Optional[torch.Tensor] = None,
    rejected_mask: Optional[torch.Tensor] = None,
    estimate_from: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gate the summed rejected log-probs (B,). Returns (gated log-probs, gate values).

    estimate_from: the plain summed rejected log-probs that p is estimated from (kinds seq, log), when
    `rejected_logps` are reweighted (LD-DPO's); default `rejected_logps` themselves.

    The gate values are one per example, or one per response token for kind token (then the summed
    log-probs are rebuilt from the gated token log-probs, so their gradient reaches the tokens).
    """
    dtype = _compute_dtype(rejected_logps)
    with torch.no_grad():
        if gate.kind in ("seq", "log"):
            plain = rejected_logps if estimate_from is None else estimate_from
            mean_logps = plain.detach().to(dtype) / rejected_lengths
            if gate.kind == "seq":
                gates = torch.sigmoid(gate.alpha * (mean_logps.exp() - gate.tau))
            else:
                gates = torch.sigmoid(gate.kappa * (mean_logps - math.log(gate.tau)))
        elif gate.kind in ("q10", "token"):
            if rejected_token_logps is None or rejected_mask is None:
                raise ValueError(f"gate kind {gate.kind!r} needs rejected_token_logps and rejected_mask")
            response = rejected_mask > 0
            token_probs = rejected_token_logps.detach().to(dtype).exp()
            if gate.kind == "q10":
                token_probs = token_probs.masked_fill(~response, float("nan"))  # nanquantile skips padding
                low_token_prob = torch.nanquantile(token_probs, gate.quantile, dim=-1)
                gates = torch.sigmoid(gate.alpha * (low_token_prob - gate.tau))
            else:
                token_gates = torch.sigmoid(gate.alpha * (token_probs - gate.tau)) * response
        else:
            raise ValueError(f"unknown gate kind {gate.kind!r}")
    if gate.kind == "token":
        token_gates = token_gates.to(rejected_token_logps.dtype)
        # value 0; gradient g_t to each response token's log-prob
        gated_token_path = (token_gates * (rejected_token_logps - rejected_token_logps.detach())).sum(-1)
        return rejected_logps.detach() + gated_token_path, token_gates[response]
    return scale_gradient(rejected_logps, gates.to(rejected_logps.dtype)), gates


def gate_metrics(gates: torch.Tensor) -> Dict[str, torch.Tensor]:
    """gate/mean, gate/min, gate/frac_below_half over the batch (over response tokens for kind token)."""
    gates = gates.detach()
    return {
        "gate/mean": gates.mean(),
        "gate/min": gates.min(),
        "gate/frac_below_half": (gates < 0.5).to(gates.dtype).mean(),
    }


def gate_distribution(example_gates: torch.Tensor) -> Dict[str, float]:
    """Per-example gates summarized: mean, min, max, 10/50/90th percentiles and the fraction below 0.5."""
    gates = example_gates.detach().to(torch.float64)
    quantiles = torch.quantile(gates, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {
        "gate/mean": float(gates.mean()),
        "gate/min": float(gates.min()),
        "gate/max": float(gates.max()),
        "gate/p10": quantiles[0],
        "gate/p50": quantiles[1],
        "gate/p90": quantiles[2],
        "gate/frac_below_half": float((gates < 0.5).to(torch.float64).mean()),
    }
