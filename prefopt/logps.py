"""Per-token and per-sequence log-probs of responses under a causal LM.

The vocabulary projection is done in chunks of positions, each under activation checkpointing, so
neither the forward nor the backward pass ever holds the whole batch's (positions x vocab) logits in
fp32: a 4 x 1024-token batch at Llama-3's 128k vocab would otherwise need 2 GB for logits alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from prefopt.data import IGNORE_INDEX


@dataclass
class TokenLogps:
    logps: torch.Tensor  # (N, T) log pi(y_t | x, y_<t) at response positions, 0 elsewhere
    mask: torch.Tensor  # (N, T) 1.0 on response positions
    max_logps: Optional[torch.Tensor] = None  # (N, T) max_v log pi(v | ...): the greedy token's log-prob
    entropy: Optional[torch.Tensor] = None  # (N, T) entropy of the next-token distribution

    @property
    def summed(self) -> torch.Tensor:
        return self.logps.sum(-1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, with_stats: bool):
    # the head module is called (not its weight read) so ZeRO-3 hooks gather the partitioned weight
    logits = head(hidden).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    token_logps = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_stats:
        return (token_logps,)
    max_logps = log_probs.max(dim=-1).values
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return token_logps, max_logps, entropy


def response_token_logps(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, chunk_size: int, with_stats: bool = False
) -> TokenLogps:
    """Log-probs of the labelled tokens (labels != -100), aligned so position t scores token t+1."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    hidden = hidden[:, :-1]
    targets = labels[:, 1:]
    mask = (targets != IGNORE_INDEX).to(torch.float32)
    safe_targets = targets.clamp(min=0)
    outputs = []
    for start in range(0, hidden.shape[1], chunk_size):
        args = (head, hidden[:, start : start + chunk_size], safe_targets[:, start : start + chunk_size], with_stats)
        if torch.is_grad_enabled():
            outputs.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            outputs.append(_chunk_logps(*args))
    columns = [torch.cat(parts, dim=1) * mask for parts in zip(*outputs)]
    return TokenLogps(columns[0], mask, *columns[1:])


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [0:B] are chosen and [B:2B] rejected (collate_pairs concatenates them for one forward)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]
