"""The preference metrics of a batch, named and defined as TRL's DPOTrainer (trl 1.16) logs them, so W&B
dashboards, comparison scripts and habits built on TRL runs read prefopt runs unchanged.

Over the logged batch (a train step: every pair of every micro batch on every rank; an eval: every eval
pair), under the `train/` or `eval/` prefix:

    rewards/chosen, rewards/rejected   mean implicit reward of the loss (DPO: beta * (log pi - log pi_ref),
                                       summed over the response's tokens)
    rewards/accuracies                 fraction of pairs whose chosen reward exceeds the rejected one
    rewards/margins                    mean of chosen reward - rejected reward
    logps/chosen, logps/rejected       mean summed log-prob of the response under the policy (nats)
    logits/chosen, logits/rejected     mean over every response token of the batch of the policy's mean
                                       logit over the vocabulary at that position (token-weighted)

prefopt's extras keep their own names: loss, lengths/chosen|rejected (mean response tokens), gate/*, ...
and, when the run has a reference model (every loss but the reference-free simpo, orpo, sft, sft_extend):

    logratios/chosen                   mean of log pi(y_w) - log pi_ref(y_w), summed over the response (nats):
                                       how far the chosen responses moved from the reference, on the same pairs
                                       (logps/chosen also moves with which pairs the batch drew)
    chosen_displaced                   fraction of pairs whose chosen log-prob fell below the reference's
                                       (likelihood displacement; read from the log-probs, not from rewards)

One difference from TRL, on purpose: TRL averages each micro batch's value over gradient accumulation
and over eval batches; prefopt pools the whole step (or eval set) first, so a short last micro batch
weighs by its pairs and tokens, not as a whole batch. With one micro batch per step they are equal.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from prefopt.core.distributed import DistInfo
from prefopt.model.logps import TokenLogps, split_pairs

# logits/* are token-weighted: each example carries its summed mean-logit in this column, and the pooled
# mean divides by the pooled response length (finish_token_means); the column itself is never logged
LOGIT_SUMS = {
    "logits/chosen": ("logit_sums/chosen", "lengths/chosen"),
    "logits/rejected": ("logit_sums/rejected", "lengths/rejected"),
}


# A pair counts as displaced when its chosen log-prob is below the reference's by more than this, per response
# token (nats). Two forwards of the same weights on differently shaped batches (a precomputed reference, padded rows
# of other lengths, bf16) differ in the last bits, so an exact `<` counts pairs that have not moved: at a learning
# rate that has barely moved anything, half of them or more. 1e-3 nats per token (a 0.1% lower probability per
# token) is above that noise and far below the falls that matter (nats to tens of nats per response).
DISPLACEMENT_TOLERANCE = 1e-3


def displacement_columns(
    chosen_logps: torch.Tensor, reference_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor
) -> dict[str, torch.Tensor]:
    """(B,) logratios/chosen and chosen_displaced (1.0 or 0.0) from summed policy and reference log-probs."""
    logratios = chosen_logps.detach().float() - reference_chosen_logps.detach().float()
    tolerance = DISPLACEMENT_TOLERANCE * chosen_lengths.float().clamp(min=1)
    return {"logratios/chosen": logratios, "chosen_displaced": (logratios < -tolerance).float()}


def pair_metrics(
    policy: TokenLogps,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    reference_chosen_logps: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """Per-pair (B,) columns of one batch whose means over the logged batch are the metrics above
    (finish_token_means turns the logit sums into logits/*). policy: the policy's log-probs of the
    batch, chosen rows first (split_pairs); rewards: the loss's (B,) implicit rewards; reference_chosen_logps:
    the reference's (B,) summed chosen log-probs, None without a reference (no displacement columns then)."""
    chosen_logps, rejected_logps = split_pairs(policy.summed.detach())
    chosen_lengths, rejected_lengths = split_pairs(policy.lengths)
    chosen_logits, rejected_logits = split_pairs(policy.mean_logits.sum(-1))  # zeros past each response's end
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    displacement = {}
    if reference_chosen_logps is not None:
        displacement = displacement_columns(chosen_logps, reference_chosen_logps, chosen_lengths)
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps,
        "logps/rejected": rejected_logps,
        "lengths/chosen": chosen_lengths,
        "lengths/rejected": rejected_lengths,
        "logit_sums/chosen": chosen_logits,
        "logit_sums/rejected": rejected_logits,
        **displacement,
    }


def finish_token_means(means: Mapping[str, float], prefix: str) -> dict[str, float]:
    """Pooled means of pair_metrics' columns (keys `{prefix}/...`) with the logit sums replaced by
    logits/* = mean logit sum / mean length, i.e. total over tokens / tokens (0.0 without tokens, as TRL)."""
    finished = dict(means)
    for name, (sums, lengths) in LOGIT_SUMS.items():
        total = finished.pop(f"{prefix}/{sums}", None)
        if total is not None:
            tokens = finished[f"{prefix}/{lengths}"]
            finished[f"{prefix}/{name}"] = total / tokens if tokens > 0 else 0.0
    return finished


def mean_metrics(per_example_parts: list[dict[str, torch.Tensor]], prefix: str, dist: DistInfo) -> dict[str, float]:
    """Means over every example of every rank (the global batch)."""
    keys = list(per_example_parts[0])
    local = torch.stack([torch.cat([part[key].float().cpu() for part in per_example_parts]) for key in keys])  # (K, N)
    global_values = dist.gather_cat(local.flatten()).view(dist.world_size, len(keys), -1)
    means = global_values.transpose(0, 1).reshape(len(keys), -1).mean(dim=1)  # one collective for every key
    return {f"{prefix}/{key}": float(mean) for key, mean in zip(keys, means)}


def reduce_loss_metrics(parts: list[dict[str, float]], dist: DistInfo) -> dict[str, float]:
    """A loss's batch metrics over micro batches and ranks: `*/min` is the global minimum (gate/min),
    everything else the mean of the micro-batch values."""
    reduced = {}
    for key in parts[0]:
        values = [float(part[key]) for part in parts]
        if key.endswith("/min"):
            reduced[f"train/{key}"] = dist.minimum(min(values))
        else:
            reduced[f"train/{key}"] = dist.sum(sum(values) / len(values)) / dist.world_size
    return reduced
