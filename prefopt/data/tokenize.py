"""Normalized rows -> token ids, truncated (truncation.py), and batches.

What a pair trains on is the text the model will read and write at inference, tokenized the way the
tokenizer tokenizes that whole text:

  With the chat template (messages, and plain-string prompts the template wraps as one user turn):
    the sequence is the template's own rendering of the conversation, prompt turns + the response as
    the assistant turn. The prompt rendered alone (add_generation_prompt=True) must be its exact text
    prefix, else the template is at fault and the row is a DataError. The response is what the template
    writes after the prompt, up to and including its last special token after the content
    (`<|im_end|>` in ChatML, not the "\\n" after it; `<|eot_id|>` in Llama-3): the model learns to end
    a turn the way the template ends one, whatever eos_token is. A template that writes no special
    token after the content gets eos_token appended. That ending is read once per tokenizer from a
    sentinel conversation (TemplateTurns).
  Plain-string prompts are templated once at most. Where the template renders prompts, a string
    prompt becomes one user message, unless it already holds the markers the template writes to open
    a user turn (`<|im_start|>`, `<|start_header_id|>`, `[INST]`: TemplateTurns.user_markers): then it
    is used as is, as raw text, and its responses still end the template's way. Other raw text (hh
    transcripts, dataset.chat_template=never, tokenizers without a template) has its responses end
    with eos_token. The template is read only where it renders prompts: never for hh transcripts or
    with dataset.chat_template=never.
  Prompt and prompt+response are tokenized in one call each (add_special_tokens=False), so a
  response gets no tokenizer artifact a mid-text response would not have (the SentencePiece dummy
  prefix `▁` of text tokenized alone). The prompt's tokens must be an exact prefix of each full
  sequence's, which is what makes the label mask right. Where the joint tokenization merges a token
  across the prompt/response boundary (BPE can, e.g. without a template), the boundary moves left to
  the last token the prompt and both full sequences share: the merged token (the prompt's last text
  and the response's first) becomes the first response token, so it is labelled, and the pair's
  prompt_ids end before it, as generation from them then continues. Such pairs are counted as
  `<split>/boundary_merges`; no label is ever shifted.
  BOS: added only for tokenizers that add one by default (Llama-style), and only when the rendered
  prompt does not already start with it (chat templates often write the BOS as text): never two.
  A response that already ends with its ending (or eos_token) text does not get a second one.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Iterator, Optional

import torch

from prefopt.data.errors import DataError
from prefopt.data.formats import Messages, PreferenceRow, holds_template_markers
from prefopt.data.truncation import TruncationLimits, truncate_pair

IGNORE_INDEX = -100  # label of positions the loss skips (prompt, padding)
TOKENIZE_CHUNK = 256  # rows per batched tokenizer call
# stand-ins for message contents when reading how the template writes a turn: no whitespace (templates trim)
USER_SENTINEL = "prefopt-user-sentinel"
ASSISTANT_SENTINEL = "prefopt-assistant-sentinel"


@dataclass
class TokenizedPair:
    prompt_ids: list[int]  # includes the BOS when the tokenizer uses one
    chosen_ids: list[int]  # ends with the end-of-turn token (template's, else EOS) unless truncated
    rejected_ids: list[int]
    prompt: str  # rendered prompt text (chat template applied), for logs and generation
    chosen: str  # response texts, without the end-of-turn text
    rejected: str
    answer: Optional[str]  # reference answer for greedy-accuracy eval (arith), else None
    source_index: int  # row index in the source file or split


@dataclass
class EncodingCounts:
    truncated: int = 0  # pairs kept after cutting the prompt and/or the responses (truncation.py)
    truncated_prompts: int = 0  # of those, pairs whose prompt was cut to dataset.max_prompt_length
    truncated_responses: int = 0  # of those, pairs with a response cut short (either limit)
    truncated_by_completion_length: int = 0  # of those, pairs with a response longer than max_completion_length
    dropped_empty_response: int = 0  # pairs dropped because a response had no token left
    boundary_merges: int = 0  # pairs whose prompt/response token boundary moved left over a merged token


@dataclass(frozen=True)
class TemplateTurns:
    """How a tokenizer's chat template writes turns, read once from a sentinel conversation."""

    user_markers: tuple[str, ...]  # what the template writes to open a user turn; a string holding one is templated
    after_response: str  # all the template writes after an assistant message's content ("<|im_end|>\n")
    end_of_turn: str  # how a response ends: after_response up to its last special token, or eos_token
    end_tokens: tuple[str, ...]  # the special tokens in end_of_turn (<|im_end|>): generation stops on each


def special_token_texts(tokenizer) -> set[str]:
    """Texts the tokenizer maps to one special token each (added specials such as <|im_end|> included)."""
    added = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return added | set(tokenizer.all_special_tokens)


def template_turns(tokenizer) -> Optional[TemplateTurns]:
    """The template's user-turn markers and assistant-turn ending; None for a tokenizer without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    conversation = [{"role": "user", "content": USER_SENTINEL}, {"role": "assistant", "content": ASSISTANT_SENTINEL}]
    try:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception as error:  # jinja raises its own types
        raise template_error(
            f"cannot render a user turn followed by an assistant turn ({type(error).__name__}: {error})"
        ) from None
    if USER_SENTINEL not in rendered or ASSISTANT_SENTINEL not in rendered:
        raise template_error("does not write message contents verbatim, so prefopt cannot tell a turn's ending apart")
    specials = special_token_texts(tokenizer)
    after_response = rendered[rendered.index(ASSISTANT_SENTINEL) + len(ASSISTANT_SENTINEL) :]
    special_ends = {text: after_response.rfind(text) + len(text) for text in specials if text in after_response}
    end_of_turn = after_response[: max(special_ends.values())] if special_ends else (tokenizer.eos_token or "")
    end_tokens = tuple(sorted((text for text in specials if text in end_of_turn), key=end_of_turn.index))
    opening = rendered[: rendered.index(USER_SENTINEL)]
    return TemplateTurns(
        user_turn_markers(opening, specials, tokenizer.bos_token), after_response, end_of_turn, end_tokens
    )


def user_turn_markers(text_before_user: str, specials: set[str], bos_text: Optional[str]) -> tuple[str, ...]:
    """The special tokens in the word the template writes right before a user message's content
    ("<|im_start|>" of "<|im_start|>user\\n"), or that word itself when it holds none ("[INST]").
    The BOS is no marker: raw text may start with it without being a rendered conversation."""
    words = text_before_user.split()
    opening = words[-1] if words else ""
    if bos_text:
        opening = opening.replace(bos_text, "")
    markers = sorted((text for text in specials if text != bos_text and text in opening), key=opening.index)
    return tuple(markers) or ((opening,) if opening else ())


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids on which generation stops: EOS and the special tokens the chat template ends a turn with."""
    try:
        turns = template_turns(tokenizer)
    except DataError:  # a template that cannot render a turn ends none: EOS still stops
        turns = None
    candidates = [tokenizer.eos_token_id] + [
        tokenizer.convert_tokens_to_ids(text) for text in (turns.end_tokens if turns else ())
    ]
    return list(dict.fromkeys(token for token in candidates if token is not None))


def template_error(problem: str) -> DataError:
    return DataError(
        f"the tokenizer's chat template {problem}; fix tokenizer.chat_template, or give prompts as already "
        f"rendered strings with dataset.chat_template=never"
    )


def tokenizer_adds_bos(tokenizer) -> bool:
    """True for tokenizers that put a BOS in front of plain text by default (Llama); SmolLM2 does not."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return False
    with_specials = tokenizer("a").input_ids
    without_specials = tokenizer("a", add_special_tokens=False).input_ids
    return with_specials[:1] == [bos_id] and without_specials[:1] != [bos_id]


def shared_prefix_length(prompt_ids: list[int], *full_ids: list[int]) -> int:
    """How many leading prompt tokens every full sequence starts with: all of them unless the joint
    tokenization merged a token across the prompt/response boundary."""
    length = len(prompt_ids)
    for sequence in full_ids:
        matching = 0
        while matching < min(length, len(sequence)) and prompt_ids[matching] == sequence[matching]:
            matching += 1
        length = matching
    return length


@dataclass
class PairText:
    """One pair as text: the prompt, and each response as given and as it follows the prompt in training."""

    prompt: str  # rendered prompt (or the raw prompt text)
    chosen: str  # response text as given, without its ending
    rejected: str
    chosen_turn: str  # the text after the prompt in the trained sequence: the response as written, ending included
    rejected_turn: str


class PairEncoder:
    """Tokenizes normalized rows into TokenizedPairs with one tokenizer and one truncation setting."""

    def __init__(self, tokenizer, limits: TruncationLimits, use_chat_template: bool = True):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token: responses must end with one; set tokenizer.eos_token")
        self.tokenizer = tokenizer
        self.limits = limits
        self.bos_id = tokenizer.bos_token_id  # kept at the front of a prompt cut from the left
        self.bos_to_add = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
        self.turns = template_turns(tokenizer) if use_chat_template else None  # None: the template is never read
        endings = (self.turns.end_of_turn, *self.turns.end_tokens) if self.turns else ()
        # a response given with its ending already does not get a second one; longest first
        self.given_endings = sorted({*endings, tokenizer.eos_token}, key=len, reverse=True)

    @property
    def user_markers(self) -> tuple[str, ...]:
        """What marks a plain-string prompt as already rendered by the template (none without one)."""
        return self.turns.user_markers if self.turns else ()

    def encode(
        self, rows: Iterable[PreferenceRow], limit: Optional[int], where: Callable[[int], str], counts: EncodingCounts
    ) -> list[TokenizedPair]:
        """The first `limit` usable pairs. Reads only as many rows as it still needs, so a capped split
        neither tokenizes nor validates rows past the cap. where: a source_index -> "file x.jsonl, line 8"
        for messages (RawSplit.where)."""
        pairs: list[TokenizedPair] = []
        rows = iter(rows)
        while limit is None or len(pairs) < limit:
            wanted = TOKENIZE_CHUNK if limit is None else min(TOKENIZE_CHUNK, limit - len(pairs))
            chunk = list(islice(rows, wanted))
            if not chunk:
                break
            pairs.extend(self.encode_chunk(chunk, where, counts))
        return pairs

    def encode_chunk(
        self, chunk: list[PreferenceRow], where: Callable[[int], str], counts: EncodingCounts
    ) -> Iterator[TokenizedPair]:
        """The chunk's usable pairs; counts truncated, dropped and boundary-merged ones."""
        texts = [self.pair_text(row, where(row.source_index)) for row in chunk]
        prompt_ids = self.token_ids([text.prompt for text in texts])
        chosen_full = self.token_ids([text.prompt + text.chosen_turn for text in texts])
        rejected_full = self.token_ids([text.prompt + text.rejected_turn for text in texts])
        for row, text, prompt_tokens, chosen_tokens, rejected_tokens in zip(
            chunk, texts, prompt_ids, chosen_full, rejected_full
        ):
            boundary = shared_prefix_length(prompt_tokens, chosen_tokens, rejected_tokens)
            merged = boundary < len(prompt_tokens)
            prompt_tokens = prompt_tokens[:boundary]
            if self.bos_to_add is not None and prompt_tokens[:1] != [self.bos_to_add]:
                prompt_tokens = [self.bos_to_add] + prompt_tokens
            cut = truncate_pair(
                prompt_tokens, chosen_tokens[boundary:], rejected_tokens[boundary:], self.limits, self.bos_id
            )
            if cut is None:
                counts.dropped_empty_response += 1
                continue
            counts.truncated += cut.truncated
            counts.truncated_prompts += cut.prompt_cut
            counts.truncated_responses += cut.responses_cut
            counts.truncated_by_completion_length += cut.by_completion_length
            counts.boundary_merges += merged
            yield TokenizedPair(
                prompt_ids=cut.prompt_ids,
                chosen_ids=cut.chosen_ids,
                rejected_ids=cut.rejected_ids,
                prompt=text.prompt,
                chosen=text.chosen,
                rejected=text.rejected,
                answer=row.answer,
                source_index=row.source_index,
            )

    def prompt_ids(self, prompt: str) -> list[int]:
        """A plain-string prompt's token ids as a pair built from it starts (before truncation): one user message
        rendered with the generation prompt where the template is used, BOS where the tokenizer adds one. What a
        model continues from when it answers the prompt (arith onpolicy sampling)."""
        text = (
            self.render([{"role": "user", "content": prompt}], "a generation prompt", add_generation_prompt=True)
            if self.turns is not None
            else prompt
        )
        ids = self.token_ids([text])[0]
        return [self.bos_to_add] + ids if self.bos_to_add is not None and ids[:1] != [self.bos_to_add] else ids

    def pair_text(self, row: PreferenceRow, where: str) -> PairText:
        """The row as the text the model reads: the template's rendering, or the raw prompt (module docstring)."""
        chosen, rejected = self.without_given_ending(row.chosen), self.without_given_ending(row.rejected)
        if isinstance(row.prompt, str):
            templated = self.turns is not None and holds_template_markers(row.prompt, self.turns.user_markers)
            ending = self.turns.end_of_turn if templated else self.tokenizer.eos_token
            return PairText(row.prompt, chosen, rejected, chosen + ending, rejected + ending)
        if self.turns is None:
            raise DataError(f"{where}: the prompt is a list of messages, but no chat template is in use to render it")
        prompt = self.render(row.prompt, where, add_generation_prompt=True)
        chosen_turn, rejected_turn = (
            self.templated_turn(row.prompt, prompt, response, where) for response in (chosen, rejected)
        )
        return PairText(prompt, chosen, rejected, chosen_turn, rejected_turn)

    def templated_turn(self, messages: Messages, prompt: str, response: str, where: str) -> str:
        """The text the template writes after `prompt` for the assistant turn `response`, up to the turn's ending."""
        conversation = self.render(
            messages + [{"role": "assistant", "content": response}], where, add_generation_prompt=False
        )
        if not conversation.startswith(prompt):
            raise DataError(
                f"{where}: the tokenizer's chat template is at fault: the prompt it renders with "
                "add_generation_prompt=True is not the start of the conversation it renders with the response as the "
                f"assistant turn, so the response cannot be told apart from the prompt. Prompt: {prompt[-200:]!r}; "
                f"conversation: {conversation[-300:]!r}. Fix tokenizer.chat_template so that a prompt's rendering is "
                "a prefix of the rendering with the response added"
            )
        turn = conversation[len(prompt) :]
        after_response = self.turns.after_response
        if not turn.endswith(after_response):
            raise DataError(
                f"{where}: the tokenizer's chat template is at fault: it ends this assistant turn ({turn[-100:]!r}) "
                f"with other text than it ends an assistant turn in general ({after_response!r}); fix "
                "tokenizer.chat_template"
            )
        return turn[: len(turn) - len(after_response)] + self.turns.end_of_turn

    def render(self, messages: Messages, where: str, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as error:  # jinja raises its own types, e.g. for a role the template rejects
            raise DataError(
                f"{where}: the tokenizer's chat template cannot render the prompt "
                f"({type(error).__name__}: {error}); fix the row's messages"
            ) from None

    def without_given_ending(self, response: str) -> str:
        for ending in self.given_endings:
            if response.endswith(ending):
                return response[: len(response) - len(ending)]
        return response

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B rows for a single forward: prompt+chosen in rows [0:B], prompt+rejected in [B:2B]."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    prompts = [pair.prompt_ids for pair in pairs] * 2
    responses = [pair.chosen_ids for pair in pairs] + [pair.rejected_ids for pair in pairs]
    return collate_sequences(prompts, responses, pad_token_id)


def collate_sequences(
    prompt_ids: list[list[int]], response_ids: list[list[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows. Labels hold the response tokens and IGNORE_INDEX on prompt
    and padding positions; prompt_lengths / response_lengths say where each part is."""
    if not prompt_ids or len(prompt_ids) != len(response_ids):
        raise ValueError(
            f"collate_sequences needs as many prompts as responses, at least one ({len(prompt_ids)} vs "
            f"{len(response_ids)})"
        )
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
