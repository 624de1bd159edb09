"""Per-token views of the probes (dynamics.token_views): which tokens of the chosen and rejected responses lost
log-prob, and where the freed mass went. The squeezing effect (Ren & Sutherland, "Learning Dynamics of LLM
Finetuning") shows per token as: the rejected tokens fall, the chosen ones often fall too, and the argmax tokens
(the greedy path) gain.

Everything comes out of the probe pass's own forward (dynamics.probe_stats): per-token log-probs of chosen and
rejected, and at each chosen position the max log-prob and its argmax token (the greedy path). Where the mass went
needs no stored distributions: the gain of token v summed over positions is

    sum_t [p_s(v | t) - p_0(v | t)] = M_s(v) - M_0(v),    M(v) = sum_t p(v | t)

over every probe's chosen positions t, so one vocab-sized vector M per evaluation (summed inside the log-softmax
chunks, model/logps.py) gives every token's exact gain; the baseline keeps M_0 (8 bytes a vocabulary entry).

The baseline is the run's first probe evaluation (step 0); a checkpoint keeps it (ProbeTokens.state), so a
resumed run's deltas and gains are still from step 0.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch

from prefopt.model.logps import TokenLogps

KINDS = ("chosen", "rejected", "greedy")  # the per-token paths: greedy is the argmax at each chosen position
TOP_GAINERS_TABLE = "dynamics/top_gainers"  # the W&B table (and the table key of top_gainers.jsonl's rows)
GAINER_COLUMNS = ["rank", "token_id", "token", "gain", "mass_start", "mass", "argmax_count", "argmax_count_start"]


@dataclass
class ProbeTokens:
    """Per-token values of every probe at one probe evaluation."""

    logps: dict[str, list[list[float]]]  # kind (KINDS) -> per probe, per position: log pi of the kind's token
    token_ids: dict[str, list[list[int]]]  # kind -> per probe, per position: the token (greedy: this step's argmax)
    mass: torch.Tensor  # (V,) float64: M(v), next-token probabilities summed over every probe's chosen positions

    def state(self) -> dict:
        """Plain lists and a tensor: what a checkpoint's trainer_state.pt holds (safe_load reads it back)."""
        return {"logps": self.logps, "token_ids": self.token_ids, "mass": self.mass}

    @classmethod
    def from_state(cls, state: dict) -> "ProbeTokens":
        return cls(state["logps"], state["token_ids"], state["mass"])


class TokenColumns:
    """Where each probe's per-token values sit in the probe pass's result row: sharding.sharded_pass gathers
    fixed-width rows, so each kind is padded to its longest response over all probes (the same on every rank),
    then the probe's own chosen-position mass (V columns) last."""

    def __init__(self, chosen_ids: list[list[int]], rejected_ids: list[list[int]]):
        self.chosen_ids, self.rejected_ids = chosen_ids, rejected_ids
        self.chosen_width = max(len(ids) for ids in chosen_ids)
        self.rejected_width = max(len(ids) for ids in rejected_ids)

    def pack(self, token: TokenLogps, chosen_rows: slice, rejected_rows: slice) -> torch.Tensor:
        """(probes, width) for one batch: chosen logps, rejected logps, greedy logps, greedy ids (exact in float64
        below 2**53), the mass. token.mass rows are the chosen sequences (sequence_logps(mass_sequences=...))."""
        parts = [
            (token.logps[chosen_rows], self.chosen_width),
            (token.logps[rejected_rows], self.rejected_width),
            (token.max_logps[chosen_rows], self.chosen_width),
            (token.argmax[chosen_rows], self.chosen_width),
        ]
        blocks = [padded(values.double().cpu(), width) for values, width in parts]
        return torch.cat([*blocks, token.mass.cpu()], dim=1)

    def unpack(self, values: torch.Tensor) -> ProbeTokens:
        """The ProbeTokens of every probe from their gathered rows (probes, width), each response cut to its length."""
        chosen_end = self.chosen_width
        rejected_end = chosen_end + self.rejected_width
        greedy_end = rejected_end + self.chosen_width
        ids_end = greedy_end + self.chosen_width
        blocks = {
            "chosen": (values[:, :chosen_end], self.chosen_ids),
            "rejected": (values[:, chosen_end:rejected_end], self.rejected_ids),
            "greedy": (values[:, rejected_end:greedy_end], self.chosen_ids),
        }
        logps = {kind: cut(block, ids) for kind, (block, ids) in blocks.items()}
        greedy_ids = [[int(token) for token in row] for row in cut(values[:, greedy_end:ids_end], self.chosen_ids)]
        token_ids = {"chosen": self.chosen_ids, "rejected": self.rejected_ids, "greedy": greedy_ids}
        return ProbeTokens(logps, token_ids, values[:, ids_end:].sum(dim=0))


def padded(values: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, width): `values` (rows, T) cut or zero-padded to `width` columns."""
    out = values.new_zeros(values.shape[0], width)
    keep = min(width, values.shape[1])
    out[:, :keep] = values[:, :keep]
    return out


def cut(block: torch.Tensor, ids: list[list[int]]) -> list[list[float]]:
    return [row[: len(probe_ids)].tolist() for row, probe_ids in zip(block, ids)]


def token_rows(step: int, tokens: ProbeTokens, baseline: ProbeTokens, decode: Callable[[int], str]) -> list[dict]:
    """The table's rows at `step`: one per (probe, kind, position) with the token, its log-prob and the change
    from the baseline's at the same position (greedy: the change of the max log-prob; its token may differ)."""
    rows = []
    for probe in range(len(tokens.token_ids["chosen"])):
        for kind in KINDS:
            start = baseline.logps[kind][probe]
            for position, (token_id, logp) in enumerate(zip(tokens.token_ids[kind][probe], tokens.logps[kind][probe])):
                rows.append(
                    {
                        "step": step,
                        "probe": probe,
                        "kind": kind,
                        "position": position,
                        "token_id": token_id,
                        "token": decode(token_id),
                        "logp": logp,
                        "delta": logp - start[position],
                    }
                )
    return rows


def top_gainers(tokens: ProbeTokens, baseline: ProbeTokens, count: int, decode: Callable[[int], str]) -> list[list]:
    """The `count` tokens whose probability, summed over every probe's chosen positions, rose most since the
    baseline: rows in GAINER_COLUMNS order (gain = mass - mass_start; argmax_count: at how many of those positions
    the token is the argmax now, argmax_count_start: at the baseline). Ties go to the lower token id."""
    gain = tokens.mass - baseline.mass
    order = torch.sort(gain, descending=True, stable=True).indices[:count].tolist()
    argmax_now = Counter(token for row in tokens.token_ids["greedy"] for token in row)
    argmax_start = Counter(token for row in baseline.token_ids["greedy"] for token in row)
    return [
        [
            rank,
            token,
            decode(token),
            float(gain[token]),
            float(baseline.mass[token]),
            float(tokens.mass[token]),
            argmax_now[token],
            argmax_start[token],
        ]
        for rank, token in enumerate(order, start=1)
    ]


def token_decoder(tokenizer) -> Callable[[int], str]:
    """One token's text as the tokenizer decodes it alone (specials kept), cached: the same ids recur every step.
    A token that is part of a character (one byte of a multi-byte one) decodes to U+FFFD alone: its vocabulary
    entry is shown instead ('<0xE4>', 'ä¸'), so different tokens keep different labels; an id past the tokenizer's
    vocabulary (a model's padded embedding rows) reads '<id N>'."""
    cache: dict[int, str] = {}

    def decode(token: int) -> str:
        if token not in cache:
            text = tokenizer.decode([token]) if token < len(tokenizer) else ""
            if not text or "\ufffd" in text:
                text = (tokenizer.convert_ids_to_tokens(token) if token < len(tokenizer) else None) or f"<id {token}>"
            cache[token] = text
        return cache[token]

    return decode
