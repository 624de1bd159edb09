"""Token-level reweighting for any loss (`loss.reweight`, conf/loss/reweight/default.yaml): how a response's
log-prob is formed from its tokens (LD-DPO) and how much each pair counts (WPO). Both apply before the loss
function, so they compose with every registered loss, a weighted run's terms and the gate.

LD-DPO (Liu et al. 2024, "Length Desensitization in Direct Preference Optimization", arXiv:2409.06411): a
pair's two responses share their first l_s = min(|y_w|, |y_l|) tokens' worth of "public" length; the tokens
past it (the longer response's excess, where verbosity lives) count with weight alpha in [0, 1]:

    log pi_LD(y|x) = sum_{t <= l_s} log pi(y_t|..) + alpha * sum_{t > l_s} log pi(y_t|..)

on the policy and on the reference alike (TRL 1.x's `ld_alpha`; alpha = 1 is the plain sum).

WPO (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", arXiv:2406.11827, eq. 2):
each pair's loss is multiplied by w(x, y_w) * w(x, y_l), detached, where

    w(x, y) = exp( mean_t [ log pi(y_t|..) - log sum_v pi(v|..)^2 ] )

the policy's length-normalized probability of the response, "aligned" by each position's sum of squared
probabilities (the probability of drawing the same token twice), as TRL 1.x's `use_weighting`. The weights
simulate on-policy data: off-policy pairs the policy would not write count less.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from prefopt.losses.hyperparameters import Hyperparameters, hyperparameter


@dataclass(frozen=True)
class ReweightParams(Hyperparameters):
    ld_alpha: float = hyperparameter(1.0, ge=0, le=1)  # LD-DPO's weight on the tokens past the shared length
    wpo: bool = hyperparameter(False)  # multiply each pair's loss by its WPO weight

    @property
    def length_desensitized(self) -> bool:
        return self.ld_alpha != 1.0


def shared_lengths(chosen_mask: torch.Tensor, rejected_mask: torch.Tensor) -> torch.Tensor:
    """(B,) l_s = min(|y_w|, |y_l|): the length both responses of a pair have."""
    return torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1))


def shared_sums(token_logps: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B,) sum of the first `lengths` response tokens' log-probs; token_logps and mask (B, T), column k = the
    k-th response token (model/logps.py's layout)."""
    positions = torch.arange(token_logps.shape[-1], device=token_logps.device)
    within = (positions.unsqueeze(0) < lengths.unsqueeze(-1)).to(token_logps.dtype) * mask.to(token_logps.dtype)
    return (token_logps * within).sum(-1)


def length_desensitized(summed: torch.Tensor, shared: torch.Tensor, alpha: float) -> torch.Tensor:
    """log pi_LD = shared + alpha * (summed - shared): the tokens past the shared length weighted by alpha."""
    return shared + alpha * (summed - shared)


def wpo_weights(
    chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    chosen_log_sum_sq: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    rejected_log_sum_sq: torch.Tensor,
) -> torch.Tensor:
    """(B,) w(x, y_w) * w(x, y_l), detached; log_sum_sq (B, T) is log sum_v pi(v|..)^2 at each response token."""

    def weight(token_logps: torch.Tensor, mask: torch.Tensor, log_sum_sq: torch.Tensor) -> torch.Tensor:
        mask = mask.to(torch.float64)
        aligned = (token_logps.detach().to(torch.float64) - log_sum_sq.to(torch.float64)) * mask
        return torch.exp(aligned.sum(-1) / mask.sum(-1).clamp(min=1))

    weights = weight(chosen_token_logps, chosen_mask, chosen_log_sum_sq) * weight(
        rejected_token_logps, rejected_mask, rejected_log_sum_sq
    )
    return weights.to(chosen_token_logps.dtype)


def parse_reweight(values: Optional[dict]) -> ReweightParams:
    """loss.reweight's values (None: all off) as typed parameters; ConfigError naming the key when wrong."""
    return ReweightParams.from_config(values or {}, key_prefix="loss.reweight.", owner="loss.reweight")
