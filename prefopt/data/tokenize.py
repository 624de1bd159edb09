"""Normalized rows -> token ids (prompt and responses separately), truncation, and batches.

The prompt and each response are tokenized separately with add_special_tokens=False and then
concatenated, so the prompt's tokens are an exact prefix of prompt+response by construction (a joint
tokenization can merge tokens across the boundary, and then the label mask is off by one).
Special tokens are added by hand, once each:
  BOS: only for tokenizers that add one by default (Llama-style), and only when the rendered prompt
       does not already start with it (chat templates often write the BOS as text): never two.
  EOS: ends every response, so the model learns to stop.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator, Optional

import torch

from prefopt.data.errors import DataError
from prefopt.data.formats import PreferenceRow

IGNORE_INDEX = -100  # label of positions the loss skips (prompt, padding)
TOKENIZE_CHUNK = 256  # rows per batched tokenizer call


@dataclass
class TokenizedPair:
    prompt_ids: list[int]  # includes the BOS when the tokenizer uses one
    chosen_ids: list[int]  # ends with EOS unless truncated
    rejected_ids: list[int]
    prompt: str  # rendered prompt text (chat template applied), for logs and generation
    chosen: str  # response texts, without EOS
    rejected: str
    answer: Optional[str]  # reference answer for greedy-accuracy eval (arith), else None
    source_index: int  # row index in the source file or split


@dataclass
class TruncationCounts:
    truncated: int = 0  # pairs kept after cutting the prompt and/or the responses
    dropped_empty_response: int = 0  # pairs dropped because a response had no token left


def tokenizer_adds_bos(tokenizer) -> bool:
    """True for tokenizers that put a BOS in front of plain text by default (Llama); SmolLM2 does not."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return False
    with_specials = tokenizer("a").input_ids
    without_specials = tokenizer("a", add_special_tokens=False).input_ids
    return with_specials[:1] == [bos_id] and without_specials[:1] != [bos_id]


def truncate_pair(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    max_length: int,
    max_prompt_length: int,
    bos_id: Optional[int],
) -> Optional[tuple[list[int], list[int], list[int], bool]]:
    """(prompt, chosen, rejected, truncated), or None when a response would be left empty.

    A pair too long for max_length first loses the start of its prompt (down to max_prompt_length,
    keeping a leading BOS: the model never saw text without it), then the ends of its responses.
    """
    if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) <= max_length:
        return prompt_ids, chosen_ids, rejected_ids, False
    if len(prompt_ids) > max_prompt_length:
        if bos_id is not None and prompt_ids[0] == bos_id:
            kept_tail = max_prompt_length - 1
            prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - kept_tail :]
        else:
            prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
    response_budget = max(max_length - len(prompt_ids), 0)
    chosen_ids, rejected_ids = chosen_ids[:response_budget], rejected_ids[:response_budget]
    if not chosen_ids or not rejected_ids:
        return None
    return prompt_ids, chosen_ids, rejected_ids, True


class PairEncoder:
    """Tokenizes normalized rows into TokenizedPairs with one tokenizer and one truncation setting."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token: responses must end with one; set tokenizer.eos_token")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.bos_id = tokenizer.bos_token_id  # kept at the front of a prompt cut from the left
        self.bos_to_add = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
        self.eos_id = tokenizer.eos_token_id

    def encode(self, rows: Iterable[PreferenceRow], limit: Optional[int], origin: str, counts: TruncationCounts) -> list[TokenizedPair]:
        """The first `limit` usable pairs. Reads only as many rows as it still needs, so a capped split
        neither tokenizes nor validates rows past the cap."""
        pairs: list[TokenizedPair] = []
        rows = iter(rows)
        while limit is None or len(pairs) < limit:
            wanted = TOKENIZE_CHUNK if limit is None else min(TOKENIZE_CHUNK, limit - len(pairs))
            chunk = list(islice(rows, wanted))
            if not chunk:
                break
            for encoded in self.encode_chunk(chunk, origin):
                if encoded is None:
                    counts.dropped_empty_response += 1
                    continue
                pair, truncated = encoded
                counts.truncated += truncated
                pairs.append(pair)
        return pairs

    def encode_chunk(self, chunk: list[PreferenceRow], origin: str) -> Iterator[Optional[tuple[TokenizedPair, bool]]]:
        prompts = [self.render_prompt(row, origin) for row in chunk]
        prompt_ids = self.token_ids(prompts)
        chosen_ids = self.token_ids([row.chosen for row in chunk])
        rejected_ids = self.token_ids([row.rejected for row in chunk])
        for row, prompt, prompt_tokens, chosen_tokens, rejected_tokens in zip(chunk, prompts, prompt_ids, chosen_ids, rejected_ids):
            if self.bos_to_add is not None and prompt_tokens[:1] != [self.bos_to_add]:
                prompt_tokens = [self.bos_to_add] + prompt_tokens
            result = truncate_pair(
                prompt_tokens,
                self.with_eos(chosen_tokens),
                self.with_eos(rejected_tokens),
                self.max_length,
                self.max_prompt_length,
                self.bos_id,
            )
            if result is None:
                yield None
                continue
            prompt_tokens, chosen_tokens, rejected_tokens, truncated = result
            pair = TokenizedPair(
                prompt_ids=prompt_tokens,
                chosen_ids=chosen_tokens,
                rejected_ids=rejected_tokens,
                prompt=prompt,
                chosen=row.chosen,
                rejected=row.rejected,
                answer=row.answer,
                source_index=row.source_index,
            )
            yield pair, truncated

    def render_prompt(self, row: PreferenceRow, origin: str) -> str:
        if isinstance(row.prompt, str):
            return row.prompt
        try:
            return self.tokenizer.apply_chat_template(row.prompt, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # jinja raises its own types, e.g. for a role the template rejects
            raise DataError(
                f"{origin}, row {row.source_index}: the tokenizer's chat template cannot render the prompt "
                f"({type(error).__name__}: {error}); fix the row's messages"
            ) from None

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def with_eos(self, token_ids: list[int]) -> list[int]:
        return token_ids if token_ids[-1:] == [self.eos_id] else token_ids + [self.eos_id]


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B rows for a single forward: prompt+chosen in rows [0:B], prompt+rejected in [B:2B]."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    prompts = [pair.prompt_ids for pair in pairs] * 2
    responses = [pair.chosen_ids for pair in pairs] + [pair.rejected_ids for pair in pairs]
    return collate_sequences(prompts, responses, pad_token_id)


def collate_sequences(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows. Labels hold the response tokens and IGNORE_INDEX on prompt
    and padding positions; prompt_lengths / response_lengths say where each part is."""
    if not prompt_ids or len(prompt_ids) != len(response_ids):
        raise ValueError(f"collate_sequences needs as many prompts as responses, at least one ({len(prompt_ids)} vs {len(response_ids)})")
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id (the tokenizer's pad_token_id)")
    width = max(len(prompt) + len(response) for prompt, response in zip(prompt_ids, response_ids))
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    labels = torch.full((len(prompt_ids), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        end = len(prompt) + len(response)
        input_ids[row, :end] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        attention_mask[row, :end] = 1
        labels[row, len(prompt) : end] = torch.tensor(response, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_lengths": torch.tensor([len(prompt) for prompt in prompt_ids], dtype=torch.long),
        "response_lengths": torch.tensor([len(response) for response in response_ids], dtype=torch.long),
    }
