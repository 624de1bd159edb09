"""The step: log-probs of a batch of pairs (one concatenated forward of the policy, and the reference's) and the
configured loss on them. Training backpropagates its loss; evaluation (evaluation.py) reads the same per-example
metrics, so an eval at step k scores exactly what a training step at k would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from prefopt.data import TokenizedPair
from prefopt.data.layout import BatchLayout, pair_groups
from prefopt.losses import preference_loss
from prefopt.model.logps import sequence_logps, split_pairs
from prefopt.train.metrics import pair_metrics
from prefopt.train.reference import CachedReference, ModelReference


def loss_hyperparameters(loss_cfg: DictConfig) -> dict[str, Any]:
    """The loss group's values that go to the loss function (its name and gate are the step's own)."""
    return {
        key: value
        for key, value in OmegaConf.to_container(loss_cfg, resolve=True).items()
        if key not in ("name", "gate")
    }


@dataclass(frozen=True)
class StepResult:
    """What PreferenceStep computed for a batch of B pairs."""

    loss: torch.Tensor  # scalar, the batch's mean loss with its graph: what training backpropagates
    loss_metrics: dict[str, Any]  # the loss's own batch metrics (gate/*, loss-specific values)
    gates: Optional[torch.Tensor]  # (B,) per-example gate when the loss is gated, else None
    per_example: dict[str, torch.Tensor]  # (B,) detached columns: loss and TRL's metrics (metrics.pair_metrics)
    tokens: int  # useful tokens of the batch (prompt and both responses of every pair), whatever the layout


class PreferenceStep:
    """Log-probs for a batch of pairs (one concatenated forward) and the configured loss on them."""

    def __init__(
        self,
        cfg: DictConfig,
        policy,
        reference: Optional[ModelReference | CachedReference],
        device: torch.device,
        pad_token_id: int,
    ):
        self.loss_name = cfg.loss.name
        self.gate = OmegaConf.to_container(cfg.loss.gate, resolve=True) if "gate" in cfg.loss else None
        self.hyperparameters = loss_hyperparameters(cfg.loss)
        self.policy, self.reference = policy, reference
        self.device, self.pad_token_id = device, pad_token_id
        self.chunk_size, self.keep_logps_mb = cfg.trainer.logp_chunk_size, cfg.trainer.logp_keep_mb
        self.max_steps = cfg.trainer.max_steps
        self.layout = BatchLayout.from_trainer(cfg.trainer)

    def __call__(self, pairs: list[TokenizedPair], step: int, min_scored_tokens: int = 0) -> StepResult:
        """min_scored_tokens: see sequence_logps (ranks scoring different pairs in step call the head equally often)."""
        batch = self.layout.build(pair_groups(pairs), self.pad_token_id).to(self.device)
        policy = sequence_logps(
            self.policy, batch, self.chunk_size, min_scored_tokens=min_scored_tokens, keep_logps_mb=self.keep_logps_mb
        )
        reference_chosen = reference_rejected = None
        if self.reference is not None:
            reference_chosen, reference_rejected = self.reference.logps(pairs, batch, min_scored_tokens)
        chosen_logps, rejected_logps = split_pairs(policy.summed)
        chosen_lengths, rejected_lengths = split_pairs(policy.lengths)
        chosen_tokens, rejected_tokens = split_pairs(policy.logps)
        chosen_mask, rejected_mask = split_pairs(policy.mask)
        out = preference_loss(
            self.loss_name,
            policy_chosen_logps=chosen_logps,
            policy_rejected_logps=rejected_logps,
            reference_chosen_logps=reference_chosen,
            reference_rejected_logps=reference_rejected,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            chosen_token_logps=chosen_tokens,
            chosen_mask=chosen_mask,
            rejected_token_logps=rejected_tokens,
            rejected_mask=rejected_mask,
            gate=self.gate,
            progress=min(step / self.max_steps, 1.0),
            **self.hyperparameters,
        )
        per_example = {
            "loss": out.losses.detach(),
            **pair_metrics(policy, out.chosen_rewards, out.rejected_rewards, reference_chosen),
        }  # TRL's names
        tokens = sum(
            len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids) for pair in pairs
        )  # useful work, any layout
        return StepResult(
            loss=out.loss, loss_metrics=out.metrics, gates=out.gates, per_example=per_example, tokens=tokens
        )
