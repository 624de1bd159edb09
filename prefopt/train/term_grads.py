"""Per-term gradient norms at the probe steps (`dynamics.term_grads`): what the chosen and the rejected side of the
loss each ask of the weights, and what the gate leaves of the rejected side.

Why: Gate-DPO claims to attenuate the gradient through the rejected log-prob where the rejected response is
improbable; LPO claims to decouple the chosen and rejected gradients. A batch-mean log-prob shows neither.

Definitions. The loss L is a function of the policy's chosen and rejected log-probs (per sequence, and per token for
the q10 / token gates). By the chain rule

    grad L = g_chosen + g_rejected

where g_chosen is the gradient that flows through the policy's chosen log-probs (the rejected ones detached) and
g_rejected the gradient through the rejected ones (the chosen ones detached). The gate (losses/gate.py) scales only
the gradient through the rejected log-probs, so for a gated loss g_rejected is reported both ungated (the same loss
with no gate) and gated; g_chosen is the same either way. Logged, to dynamics.jsonl beside the probes and to W&B:

    dynamics/grad/chosen_norm           |g_chosen|
    dynamics/grad/rejected_norm         |g_rejected| of the ungated loss
    dynamics/grad/cos                   cos(g_chosen, g_rejected ungated)
    dynamics/grad/total_norm            |g_chosen + g_rejected| of the loss as trained (gated when gated)
  and, when the loss has a gate:
    dynamics/grad/rejected_gated_norm   |g_rejected| of the gated loss
    dynamics/grad/cos_gated             cos(g_chosen, g_rejected gated)
    dynamics/grad/gate_ratio            rejected_gated_norm / rejected_norm

Norms are over the trainable parameters (what the optimizer moves; with LoRA the adapters), accumulated in fp32. A
cosine or ratio with a zero norm in it is undefined: NaN (null in the JSON line).

The batch: dynamics.term_grads_pairs training pairs drawn once by a random.Random seeded by trainer.seed (torch's and
the sampler's generators are never touched), the same at every probe step and after a resume; the loss is the mean
over them, as a training step's is over its micro batch. Reference log-probs come from the step's reference.

Cost, at probe steps only: one forward of those pairs with its graph (in eval mode: no dropout), the reference's
log-probs of them (a forward of the reference model, or the precomputed cache), and 2 (ungated loss) or 3 (gated)
backward passes by torch.autograd.grad on the one graph; memory: that forward's activations and two gradient-sized
buffers of the trainable parameters at a time. autograd.grad writes no .grad, so the run's gradients and optimizer
state are untouched and training is the same with the feature on or off. Every rank computes the same batch (it is
small); rank 0 logs. Tested on two DeepSpeed ranks at ZeRO-0 and ZeRO-2 (the values of one process). Refused in
validate_config: ZeRO-3 (it partitions the weights, so no rank holds a whole gradient) and trainer.compile (a compiled
backward donates its buffers and cannot run twice over one forward).
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch

from prefopt.data import TokenizedPair
from prefopt.losses.gate import parse_gate
from prefopt.train.engine import trainable_parameters
from prefopt.train.step import PreferenceStep

PREFIX = "dynamics/grad/"


def term_gradient_pairs(train_pairs: Sequence[TokenizedPair], count: int, seed: int) -> list[TokenizedPair]:
    """`count` training pairs (all of them when there are fewer), drawn by their own seeded generator."""
    indices = random.Random(seed).sample(range(len(train_pairs)), min(count, len(train_pairs)))
    return [train_pairs[index] for index in indices]


def term_gradient(loss: torch.Tensor, parameters: list[torch.nn.Parameter], retain_graph: bool) -> list:
    """d loss / d parameters without touching .grad; None for a parameter the loss does not reach (zero), and all
    None when it reaches none (a loss with no rejected term, detached on its chosen side)."""
    if not loss.requires_grad:
        return [None] * len(parameters)
    return list(torch.autograd.grad(loss, parameters, retain_graph=retain_graph, allow_unused=True))


def dot(first: list, second: list) -> float:
    """Sum over parameters of <first, second>, each term in fp32; None is a zero gradient."""
    terms = [
        torch.dot(a.flatten().float(), b.flatten().float()).double()
        for a, b in zip(first, second)
        if a is not None and b is not None
    ]
    return float(torch.stack(terms).sum()) if terms else 0.0


def sum_norm(first: list, second: list) -> float:
    """|first + second|, the sum formed per parameter (no cancellation from |a|^2 + |b|^2 + 2<a, b>)."""
    terms = []
    for a, b in zip(first, second):
        if a is None and b is None:
            continue
        total = (a.float() if a is not None else 0) + (b.float() if b is not None else 0)
        terms.append(total.pow(2).sum().double())
    return math.sqrt(float(torch.stack(terms).sum())) if terms else 0.0


def cosine(product: float, first_norm: float, second_norm: float) -> float:
    return product / (first_norm * second_norm) if first_norm > 0 and second_norm > 0 else float("nan")


class TermGradients:
    """The per-term gradient metrics of a fixed batch of pairs under the step's policy, loss and reference."""

    def __init__(self, step_fn: PreferenceStep, pairs: list[TokenizedPair]):
        if not pairs:
            raise ValueError("term gradients need at least one training pair")
        self.step_fn, self.pairs = step_fn, pairs
        self.gated = parse_gate(step_fn.gate, step_fn.plan) is not None  # kind none: no gate

    def __call__(self, step: int) -> dict[str, float]:
        """The metrics at training step `step` (a scheduled loss reads its progress, as the held-out eval does)."""
        policy = self.step_fn.policy
        was_training = policy.training
        policy.eval()  # no dropout: the same weights score the same batch the same way at every probe step
        try:
            with torch.enable_grad():
                return self.metrics(step)
        finally:
            policy.train(was_training)

    def metrics(self, step: int) -> dict[str, float]:
        parameters = trainable_parameters(self.step_fn.policy)
        logps = self.step_fn.logps(self.pairs)  # one forward; each loss below is a small graph on top of it

        def gradient(gated: bool, grad_through: str, last: bool) -> list:
            loss = self.step_fn.loss(logps, step, gated=gated, grad_through=grad_through).loss
            return term_gradient(loss, parameters, retain_graph=not last)

        chosen = gradient(gated=False, grad_through="chosen", last=False)  # the gate never touches this side
        chosen_norm = math.sqrt(dot(chosen, chosen))
        rejected = gradient(gated=False, grad_through="rejected", last=not self.gated)
        rejected_norm = math.sqrt(dot(rejected, rejected))
        metrics = {
            "chosen_norm": chosen_norm,
            "rejected_norm": rejected_norm,
            "cos": cosine(dot(chosen, rejected), chosen_norm, rejected_norm),
        }
        if not self.gated:
            metrics["total_norm"] = sum_norm(chosen, rejected)
        else:
            del rejected  # two gradient-sized buffers at a time
            gated = gradient(gated=True, grad_through="rejected", last=True)
            gated_norm = math.sqrt(dot(gated, gated))
            metrics |= {
                "total_norm": sum_norm(chosen, gated),
                "rejected_gated_norm": gated_norm,
                "cos_gated": cosine(dot(chosen, gated), chosen_norm, gated_norm),
                "gate_ratio": gated_norm / rejected_norm if rejected_norm > 0 else float("nan"),
            }
        return {PREFIX + key: value for key, value in metrics.items()}
