"""How scored sequences are laid out for the model: a layout decision of data/, not of the trainer.

A *group* is one prompt and the responses scored after it (a preference pair: chosen and rejected; a
probe: chosen, rejected, greedy and the others). Every response is a *sequence* with an index; the
log-probs come back per sequence (rows of TokenLogps), whatever the layout:

  padded : one row per sequence, prompt + response, right-padded (the reference path).
  packed : one segment per group, [prompt | response 1 | response 2 | ...]: each response attends to the
           prompt and to itself, never to the other responses, and its position ids continue from the
           end of the prompt, so the prompt is computed once (prefix sharing). Segments are packed into
           rows of at most `max_row_tokens` tokens (first fit, longest first; None = row_budget: one row
           for pieces, the longest segment for dense), so almost no position is padding. The first token
           of each response is scored from the prompt's last position, the rest from the previous one.

A packed batch is attended one of two ways (`attention`): `pieces` records the plan (AttentionPieces: each
prompt and each response one piece; model/attention.py attends them one by one, no mask is built), `dense`
builds a 4-D (rows, 1, L, L) mask: boolean (True = attend) for SDPA, additive (0 / dtype min) for eager
attention, which adds it to the scores. All give the same log-probs up to float rounding
(tests/test_packing.py, tests/test_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch.nn.attention.bias import causal_lower_right

LAYOUTS = ("packed", "padded")
ATTENTIONS = ("pieces", "dense")  # how a packed batch is attended: model/attention.py, or the dense 4-D mask


@dataclass
class AttentionPieces:
    """The pieces of a packed batch, in row order, covering each row from column 0 without gaps.

    Each is (row, query_start, query_end, prefix_start, prefix_end): queries [query_start, query_end) attend
    to keys [prefix_start, prefix_end) (the prompt; empty for the prompt piece itself) and causally to
    their own keys. Columns past a row's last piece are padding; their output is zero."""

    pieces: tuple[tuple[int, int, int, int, int], ...]
    rows: int
    width: int
    windows_seen: set = field(default_factory=set, repr=False, compare=False)  # sliding windows layers asked for
    _masks: dict = field(default_factory=dict, repr=False, compare=False)
    _chunks: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self):
        """Refuses a plan the attention would read wrongly: rows in order, each covered from column 0 without gaps
        (padding only at its end), every prefix exactly the range of an earlier prompt piece of its row."""
        for row in range(self.rows):
            pieces = [piece for piece in self.pieces if piece[0] == row]
            prompts = {(q_start, q_end) for _, q_start, q_end, p_start, p_end in pieces if p_start == p_end}
            cursor = 0
            for piece in pieces:
                _, q_start, q_end, p_start, p_end = piece
                if q_start != cursor or q_end <= q_start or (p_end > p_start and (p_start, p_end) not in prompts):
                    raise ValueError(
                        f"attention pieces of row {row} are not contiguous prompt/response pieces: {piece}"
                    )
                cursor = q_end
            if cursor > self.width:
                raise ValueError(f"attention pieces of row {row} end at {cursor}, past the width {self.width}")
            index_at = {q_start: index for index, (_, q_start, _, _, _) in enumerate(pieces)}
            sizes = [q_end - q_start for _, q_start, q_end, _, _ in pieces]
            prefixes = [index_at[p_start] if p_end > p_start else None for _, _, _, p_start, p_end in pieces]
            self._chunks.append((sizes, prefixes))
        if [piece[0] for piece in self.pieces] != sorted(piece[0] for piece in self.pieces) or any(
            not 0 <= piece[0] < self.rows for piece in self.pieces
        ):
            raise ValueError("attention pieces are not in row order within 0..rows-1")

    def row_chunks(self, row: int) -> tuple[list[int], list[Optional[int]]]:
        """(query lengths of the row's pieces in order, and per piece the index of its prefix's piece or None):
        the prefix of a response is exactly its prompt piece's range."""
        return self._chunks[row]

    def masks(self, window: Optional[int], device, lower_right_bias: bool = False) -> list:
        """Per piece, the boolean (queries, keys) mask, or None where plain top-left causal is exact (a piece
        without prefix or window). lower_right_bias: a window-less response piece gets torch's CausalBias
        (causal aligned to the bottom right) instead of a tensor, which CUDA's flash kernels take. Built once per
        forward, window and device, shared by every layer (boolean: the dtype does not matter)."""
        key = (window, str(device), lower_right_bias)
        if key not in self._masks:
            self._masks[key] = [
                causal_lower_right(piece[2] - piece[1], piece[2] - piece[1] + piece[4] - piece[3])
                if lower_right_bias and not window and piece[4] > piece[3]
                else self._mask(piece, window, device)
                for piece in self.pieces
            ]
        return self._masks[key]

    @staticmethod
    def _mask(piece, window: Optional[int], device) -> Optional[torch.Tensor]:
        _, q_start, q_end, p_start, p_end = piece
        prefix, queries = p_end - p_start, q_end - q_start
        if prefix == 0 and not window:
            return None
        # positions: the prefix holds 0..prefix-1, the queries (and their own keys) continue from prefix
        query_pos = torch.arange(prefix, prefix + queries, device=device).unsqueeze(1)
        key_pos = torch.arange(prefix + queries, device=device).unsqueeze(0)
        allowed = key_pos <= query_pos
        if window:
            allowed &= query_pos - key_pos < window  # transformers' sliding window: keys within the last `window`
        return allowed


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (R, L)
    # (R, L) padding mask (padded), (R, 1, L, L) boolean attend-mask (packed, dense), None (packed, pieces)
    attention_mask: Optional[torch.Tensor]
    position_ids: Optional[torch.Tensor]  # (R, L) for packed rows; None = 0..L-1
    predictor_rows: torch.Tensor  # (S,) row of the position whose hidden state predicts scored token s
    predictor_cols: torch.Tensor  # (S,) its column
    targets: torch.Tensor  # (S,) the scored token ids
    sequence_index: torch.Tensor  # (S,) which sequence each scored token belongs to
    token_index: torch.Tensor  # (S,) its index within that sequence's response
    num_sequences: int
    max_response_length: int
    real_tokens: int  # non-padding positions, for throughput
    pieces: Optional[AttentionPieces] = None  # packed with attention=pieces: the plan (attention_mask is None then)

    def to(self, device) -> "SequenceBatch":
        moved = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in vars(self).items()
        }
        return SequenceBatch(**moved)


Group = tuple[Sequence[int], list[tuple[int, Sequence[int]]]]  # (prompt ids, [(sequence index, response ids), ...])


def pair_groups(pairs) -> list[Group]:
    """Preference pairs as groups: chosen responses are sequences 0..B-1, rejected ones B..2B-1 (split_pairs)."""
    count = len(pairs)
    return [
        (pair.prompt_ids, [(index, pair.chosen_ids), (count + index, pair.rejected_ids)])
        for index, pair in enumerate(pairs)
    ]


@dataclass(frozen=True)
class BatchLayout:
    """How a run lays out every batch it scores (training, reference pass, eval, probes): trainer.batching,
    trainer.packed_row_tokens and trainer.attention."""

    kind: str = "packed"  # packed | padded
    row_tokens: Optional[int] = None  # packed row budget; None = row_budget() of each batch
    attention: str = "pieces"  # packed batches: pieces (model/attention.py) | dense (a 4-D mask per row)

    @classmethod
    def from_trainer(cls, trainer_cfg) -> "BatchLayout":
        return cls(trainer_cfg.batching, trainer_cfg.packed_row_tokens, trainer_cfg.attention)

    def build(self, groups: list["Group"], pad_token_id: int) -> SequenceBatch:
        return build_batch(groups, pad_token_id, self.kind, self.row_tokens, self.attention)

    def positions(self, pair_lengths: Sequence[tuple[int, int, int]]) -> int:
        """Positions (rows x width, padding included) of the batch build() makes from pairs of these (prompt, chosen,
        rejected) lengths, without building it: what a forward's activations and FLOPs scale with (run/resources.py)."""
        if self.kind == "padded":
            width = max(prompt + max(chosen, rejected) for prompt, chosen, rejected in pair_lengths)
            return 2 * len(pair_lengths) * width
        segments = [sum(lengths) for lengths in pair_lengths]
        rows = packed_rows(segments, self.row_tokens, self.attention)
        return len(rows) * max(sum(segments[segment] for segment in members) for members in rows)


PADDED = BatchLayout("padded")


def row_budget(segment_lengths: Sequence[int], attention: str) -> int:
    """The token budget of a packed row when trainer.packed_row_tokens is null (0 = one row for the batch).

    pieces: attention never crosses a piece, so a row's width costs nothing and the batch goes in one row
      (no padding at all).
    dense: every query of a row scores every key, so attention grows with width^2 while padding shrinks with
      wider rows. The longest segment is the budget: rows come out nearly full (first fit, longest first)
      and no row is wider than it must be. `scripts/bench_step.py --row-budgets` measured both rules against
      fixed budgets on HH-like pairs (README, Benchmarks: "How the row budget was chosen")."""
    if attention == "pieces":
        return 0
    return max(segment_lengths)


def build_batch(
    groups: list[Group], pad_token_id: int, layout: str, max_row_tokens: Optional[int] = None, attention: str = "pieces"
) -> SequenceBatch:
    if layout == "padded":
        return padded_batch(groups, pad_token_id)
    if layout == "packed":
        return packed_batch(groups, pad_token_id, max_row_tokens, attention)
    raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")


def padded_batch(groups: list[Group], pad_token_id: int) -> SequenceBatch:
    rows = [(prompt, index, response) for prompt, responses in groups for index, response in responses]
    width = max(len(prompt) + len(response) for prompt, _, response in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    scored = ScoredTokens()
    for row, (prompt, index, response) in enumerate(rows):
        tokens = list(prompt) + list(response)
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
        for k, token in enumerate(response):
            scored.add(row, len(prompt) + k - 1, token, index, k)
    return scored.batch(input_ids, attention_mask, None, len(rows), int(attention_mask.sum()))


def packed_rows(segment_lengths: Sequence[int], max_row_tokens: Optional[int], attention: str) -> list[list[int]]:
    """Segment indices per packed row: first fit, longest first (a deterministic order), in rows of at most
    max_row_tokens (None = row_budget(), 0 = unbounded: one row); a segment longer than that gets a row of its own."""
    if max_row_tokens is None:
        max_row_tokens = row_budget(segment_lengths, attention)
    budget = max(max_row_tokens or sum(segment_lengths), max(segment_lengths))
    rows: list[list[int]] = []
    row_lengths: list[int] = []
    for segment in sorted(range(len(segment_lengths)), key=lambda g: (-segment_lengths[g], g)):
        for row, used in enumerate(row_lengths):
            if used + segment_lengths[segment] <= budget:
                rows[row].append(segment)
                row_lengths[row] += segment_lengths[segment]
                break
        else:
            rows.append([segment])
            row_lengths.append(segment_lengths[segment])
    return rows


def packed_batch(
    groups: list[Group], pad_token_id: int, max_row_tokens: Optional[int], attention: str = "pieces"
) -> SequenceBatch:
    """max_row_tokens: the row budget (None = row_budget(), 0 = unbounded: one row). attention=pieces records
    the pieces instead of building the dense (rows, 1, width, width) mask."""
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; one of {ATTENTIONS}")
    lengths = [len(prompt) + sum(len(response) for _, response in responses) for prompt, responses in groups]
    rows = packed_rows(lengths, max_row_tokens, attention)
    row_lengths = [sum(lengths[group] for group in members) for members in rows]
    width = max(row_lengths)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    dense = attention == "dense"
    attend = torch.zeros((len(rows), width, width), dtype=torch.bool) if dense else None
    pieces: list[tuple[int, int, int, int, int]] = []
    scored = ScoredTokens()
    for row, members in enumerate(rows):
        start = 0
        for group in members:
            prompt, responses = groups[group]
            prompt_end = start + len(prompt)
            input_ids[row, start:prompt_end] = torch.tensor(list(prompt), dtype=torch.long)
            position_ids[row, start:prompt_end] = torch.arange(len(prompt))
            pieces.append((row, start, prompt_end, start, start))
            if dense:
                attend[row, start:prompt_end, start:prompt_end] = torch.ones(
                    len(prompt), len(prompt), dtype=torch.bool
                ).tril()
            cursor = prompt_end
            for index, response in responses:
                end = cursor + len(response)
                input_ids[row, cursor:end] = torch.tensor(list(response), dtype=torch.long)
                position_ids[row, cursor:end] = torch.arange(len(prompt), len(prompt) + len(response))
                pieces.append((row, cursor, end, start, prompt_end))
                if dense:
                    attend[row, cursor:end, start:prompt_end] = True  # the whole prompt
                    attend[row, cursor:end, cursor:end] = torch.ones(
                        len(response), len(response), dtype=torch.bool
                    ).tril()
                for k, token in enumerate(response):
                    scored.add(row, prompt_end - 1 if k == 0 else cursor + k - 1, token, index, k)
                cursor = end
            start = cursor
        if dense:
            padding = torch.arange(start, width)
            attend[row, padding, padding] = True  # padding attends to itself only (a fully masked row would be NaN)
    batch = scored.batch(
        input_ids,
        attend.unsqueeze(1) if dense else None,
        position_ids,
        sum(len(responses) for _, responses in groups),
        sum(row_lengths),
    )
    if not dense:
        batch.pieces = AttentionPieces(tuple(pieces), rows=len(rows), width=width)
    return batch


class ScoredTokens:
    """Collects (predictor position, target, sequence, token index) for every scored response token."""

    def __init__(self):
        self.rows, self.cols, self.targets, self.sequences, self.tokens = [], [], [], [], []

    def add(self, row: int, col: int, target: int, sequence: int, token: int) -> None:
        self.rows.append(row)
        self.cols.append(col)
        self.targets.append(target)
        self.sequences.append(sequence)
        self.tokens.append(token)

    def batch(self, input_ids, attention_mask, position_ids, num_sequences: int, real_tokens: int) -> SequenceBatch:
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        return SequenceBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            predictor_rows=as_tensor(self.rows),
            predictor_cols=as_tensor(self.cols),
            targets=as_tensor(self.targets),
            sequence_index=as_tensor(self.sequences),
            token_index=as_tensor(self.tokens),
            num_sequences=num_sequences,
            max_response_length=max(self.tokens, default=-1) + 1,
            real_tokens=real_tokens,
        )
