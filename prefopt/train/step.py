"""The step: log-probs of a batch of pairs (one concatenated forward of the policy, and the reference's) and the
configured loss on them. Training backpropagates its loss; evaluation (evaluation.py) reads the same per-example
metrics, so an eval at step k scores exactly what a training step at k would. The forward (logps) and the loss on its
log-probs (loss) are separate calls, so the per-term gradients (term_grads.py) take several losses of one forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from prefopt.data import TokenizedPair
from prefopt.data.layout import BatchLayout, pair_groups
from prefopt.losses import LossOutput, loss_plan_of, preference_loss
from prefopt.model.logps import TokenLogps, sequence_logps, split_pairs
from prefopt.train.metrics import pair_metrics
from prefopt.train.reference import CachedReference, ModelReference


def loss_hyperparameters(loss_cfg: DictConfig) -> dict[str, Any]:
    """The loss group's values that go to the loss function (its name, gate and reweighting are the step's own)."""
    return {
        key: value
        for key, value in OmegaConf.to_container(loss_cfg, resolve=True).items()
        if key not in ("name", "gate", "reweight")
    }


GRAD_PATHS = ("both", "chosen", "rejected")  # PreferenceStep.loss: which policy log-probs carry the gradient


@dataclass(frozen=True)
class PairLogps:
    """Log-probs of a batch of B pairs: the policy's 2B sequences (chosen rows, then rejected: split_pairs), with
    their graph when gradients are on, and the reference's summed (B,) values (None for a reference-free loss)."""

    policy: TokenLogps
    reference_chosen: Optional[torch.Tensor]
    reference_rejected: Optional[torch.Tensor]
    reference_chosen_shared: Optional[torch.Tensor] = None  # summed over the pair's shared length (LD-DPO)
    reference_rejected_shared: Optional[torch.Tensor] = None


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
        self.plan = loss_plan_of(cfg.loss)  # its terms: one, or a weighted run's several
        self.reweight = OmegaConf.to_container(cfg.loss.reweight, resolve=True) if "reweight" in cfg.loss else None
        self.wpo = bool(self.reweight and self.reweight.get("wpo"))  # the head also returns log sum_v pi(v)^2
        self.policy, self.reference = policy, reference
        self.device, self.pad_token_id = device, pad_token_id
        self.chunk_size, self.keep_logps_mb = cfg.trainer.logp_chunk_size, cfg.trainer.logp_keep_mb
        self.max_steps = cfg.trainer.max_steps
        self.layout = BatchLayout.from_trainer(cfg.trainer)

    def logps(self, pairs: list[TokenizedPair], min_scored_tokens: int = 0) -> PairLogps:
        """The policy's log-probs of `pairs` (one forward, with its graph when gradients are on) and the reference's.
        min_scored_tokens: see sequence_logps (ranks scoring different pairs in step call the head equally often)."""
        batch = self.layout.build(pair_groups(pairs), self.pad_token_id).to(self.device)
        policy = sequence_logps(
            self.policy,
            batch,
            self.chunk_size,
            min_scored_tokens=min_scored_tokens,
            keep_logps_mb=self.keep_logps_mb,
            with_log_sum_sq=self.wpo,
        )
        if self.reference is None:
            return PairLogps(policy, None, None)
        return PairLogps(policy, *self.reference.logps(pairs, batch, min_scored_tokens))

    def loss(self, logps: PairLogps, step: int, gated: bool = True, grad_through: str = "both") -> LossOutput:
        """The configured loss on `logps` at training step `step` (scheduled losses read its progress).

        gated=False: the same loss without its gate (the gate changes no value, only the gradient through the
        rejected log-probs). grad_through: which of the policy's log-probs carry the gradient, "both" (training),
        or "chosen" / "rejected" with the other side detached: the two terms of the chain rule (term_grads.py)."""
        if grad_through not in GRAD_PATHS:
            raise ValueError(f"grad_through={grad_through!r}; use one of {GRAD_PATHS}")
        policy = logps.policy
        chosen_logps, rejected_logps = split_pairs(policy.summed)
        chosen_lengths, rejected_lengths = split_pairs(policy.lengths)
        chosen_tokens, rejected_tokens = split_pairs(policy.logps)
        chosen_mask, rejected_mask = split_pairs(policy.mask)
        chosen_log_sum_sq, rejected_log_sum_sq = split_pairs(policy.log_sum_sq) if self.wpo else (None, None)
        if grad_through == "rejected":
            chosen_logps, chosen_tokens = chosen_logps.detach(), chosen_tokens.detach()
        elif grad_through == "chosen":
            rejected_logps, rejected_tokens = rejected_logps.detach(), rejected_tokens.detach()
        return preference_loss(
            self.loss_name,
            policy_chosen_logps=chosen_logps,
            policy_rejected_logps=rejected_logps,
            reference_chosen_logps=logps.reference_chosen,
            reference_rejected_logps=logps.reference_rejected,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            chosen_token_logps=chosen_tokens,
            chosen_mask=chosen_mask,
            rejected_token_logps=rejected_tokens,
            rejected_mask=rejected_mask,
            gate=self.gate if gated else None,
            reweight=self.reweight,
            reference_chosen_shared=logps.reference_chosen_shared,
            reference_rejected_shared=logps.reference_rejected_shared,
            chosen_log_sum_sq=chosen_log_sum_sq,
            rejected_log_sum_sq=rejected_log_sum_sq,
            progress=min(step / self.max_steps, 1.0),
            **self.hyperparameters,
        )

    def __call__(self, pairs: list[TokenizedPair], step: int, min_scored_tokens: int = 0) -> StepResult:
        """The loss and metrics of `pairs` at training step `step`; min_scored_tokens: see logps."""
        logps = self.logps(pairs, min_scored_tokens)
        out = self.loss(logps, step)
        per_example = {
            "loss": out.losses.detach(),
            **{f"loss/{term}": losses for term, losses in out.term_losses.items()},  # a weighted run's terms
            **pair_metrics(logps.policy, out.chosen_rewards, out.rejected_rewards, logps.reference_chosen),
        }  # TRL's names
        tokens = sum(
            len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids) for pair in pairs
        )  # useful work, any layout
        return StepResult(
            loss=out.loss, loss_metrics=out.metrics, gates=out.gates, per_example=per_example, tokens=tokens
        )
