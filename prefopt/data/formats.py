"""Row layouts -> one normalized `PreferenceRow`; malformed rows are errors (or skipped and counted).

Three layouts (`dataset.format`, or detected when `auto` from the first row whose columns fit one, so a
malformed first row is a bad row like any other):
  strings  : {prompt: str, chosen: str, rejected: str}
  messages : {prompt: str | [{role, content}], chosen / rejected: [{role, content}] ending with the
             assistant turn}. Lists that repeat the prompt turns (UltraFeedback's do) are stripped of them.
  hh       : {chosen: str, rejected: str}, full "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts (HH-RLHF).
             The prompt is everything up to and including the last "\\n\\nAssistant:" of the chosen
             transcript. The space after that marker stays with the response: BPE vocabularies hold
             " word" tokens, so " Sure" tokenizes as the model would see it mid-transcript, and the
             prompt ends on the marker exactly as HH's own prompts do.
Strings and messages rows may carry an optional `answer` column: a reference answer for greedy eval.

A plain-string prompt is templated once at most. Where the chat template is in use, it becomes one user
message for the template, unless it already holds the markers the template writes to open a user turn
(`<|im_start|>`, `<|start_header_id|>`, `[INST]`, ...: the tokenizer's TemplateTurns.user_markers): then
it is already a rendered conversation and stays raw text, used as is (tokenize.py ends its responses
the template's way).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from prefopt.data.errors import DataError, bad_row_error
from prefopt.data.sources import RawSplit, UnreadableRow

logger = logging.getLogger("prefopt.data")

HH_ASSISTANT_MARKER = "\n\nAssistant:"
FORMAT_COLUMNS = {
    "strings": ("prompt", "chosen", "rejected"),
    "messages": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
}
FORMAT_DESCRIPTIONS = {
    "strings": "prompt, chosen, rejected (strings)",
    "messages": "prompt (string or list of {role, content}), chosen, rejected (lists of {role, content} ending with the assistant turn)",
    "hh": "chosen, rejected (full '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts)",
}
Messages = list  # [{"role": str, "content": str}, ...]


@dataclass
class PreferenceRow:
    source_index: int  # 0-based position in the source's rows (RawSplit.indices); messages show RawSplit.position
    prompt: Union[str, Messages]  # raw text (used as is), or messages to render with the chat template
    chosen: str  # response text, without EOS
    rejected: str
    answer: Optional[str] = None  # reference answer for greedy-accuracy eval


class BadRow(Exception):
    """A malformed row; the caller turns it into a DataError naming the source, or skips it."""


@dataclass
class SkippedRows:
    """Rows skipped under on_bad_row=skip: counted for stats, a few kept for the warning."""

    origin: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, position: str, problem: str) -> None:
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(f"{position}: {problem}")

    def warn(self) -> None:
        if self.count:
            logger.warning("%s: skipped %d bad rows, e.g. %s", self.origin, self.count, "; ".join(self.examples))


def resolve_format(configured: str, split: RawSplit) -> str:
    """The configured format, or the one the rows show; checks that some row has its columns. The first
    object row whose columns fit decides, so rows that are unreadable or lack a column stay bad rows
    for dataset.on_bad_row, not a verdict on the whole file."""
    if not len(split):
        raise DataError(f"{split.origin} has no rows")
    first_object = None
    for _, row in split:
        if not isinstance(row, dict):
            continue
        if first_object is None:
            first_object = row
        row_format = format_of_columns(configured, row)
        if row_format is not None:
            return row_format
    if first_object is None:
        first_index, first_row = next(iter(split))
        problem = first_row.problem if isinstance(first_row, UnreadableRow) else f"got {type(first_row).__name__}"
        raise DataError(f"{split.origin}: no row is an object with named fields (the first, {split.position(first_index)}: {problem})")
    raise wrong_columns_error(configured, split.origin, set(first_object))


def format_of_columns(configured: str, row: dict) -> Optional[str]:
    """The layout of a row (the configured one, or detected under auto) if its columns fit it; else None."""
    columns = set(row)
    if configured != "auto":
        return configured if set(FORMAT_COLUMNS[configured]) <= columns else None
    if set(FORMAT_COLUMNS["strings"]) <= columns:
        values = [row[name] for name in FORMAT_COLUMNS["strings"]]
        return "messages" if any(isinstance(value, (list, dict)) for value in values) else "strings"
    if set(FORMAT_COLUMNS["hh"]) <= columns:
        return "hh"
    return None


def wrong_columns_error(configured: str, origin: str, columns: set) -> DataError:
    expected = "; ".join(f"{name}: {FORMAT_DESCRIPTIONS[name]}" for name in FORMAT_COLUMNS)
    wanted = f"dataset.format={configured} expects {FORMAT_DESCRIPTIONS[configured]}" if configured != "auto" else ""
    return DataError(
        f"{origin}: wrong columns. Found: {', '.join(sorted(columns)) or '(none)'}. Expected, per format: {expected}. "
        f"{wanted + '. ' if wanted else ''}Rename the columns, or set dataset.format to the layout the file has"
    )


def normalize_rows(
    split: RawSplit,
    row_format: str,
    string_prompt_as_user_message: bool,
    on_bad_row: str,
    skipped: SkippedRows,
    template_markers: tuple[str, ...] = (),
) -> Iterator[PreferenceRow]:
    """Normalized rows, lazily (a capped split stops reading early). Bad rows raise or go to `skipped`.
    template_markers: what marks a string prompt as already rendered by the chat template (module docstring)."""
    for index, row in split:
        try:
            normalized = normalize_row(index, row, row_format, string_prompt_as_user_message, template_markers)
        except BadRow as bad:
            if on_bad_row == "error":
                raise bad_row_error(split.where(index), str(bad)) from None
            skipped.add(split.position(index), str(bad))
            continue
        yield normalized


def normalize_row(
    source_index: int, row: Any, row_format: str, string_prompt_as_user_message: bool, template_markers: tuple[str, ...] = ()
) -> PreferenceRow:
    if isinstance(row, UnreadableRow):
        raise BadRow(row.problem)
    if not isinstance(row, dict):
        raise BadRow(f"a row must be an object with named fields, got {type(row).__name__}")
    if row_format == "hh":
        prompt, chosen, rejected = split_hh_transcripts(required_string(row, "chosen"), required_string(row, "rejected"))
    elif row_format == "strings":
        prompt = required_string(row, "prompt")
        chosen, rejected = required_string(row, "chosen"), required_string(row, "rejected")
        if string_prompt_as_user_message and not holds_template_markers(prompt, template_markers):
            prompt = [{"role": "user", "content": prompt}]
    elif row_format == "messages":
        prompt, chosen, rejected = split_message_rows(row, template_markers)
    else:
        raise ValueError(f"unknown row format {row_format!r}")
    check_responses(chosen, rejected)
    answer = row.get("answer") if row_format != "hh" else None
    return PreferenceRow(source_index, prompt, chosen, rejected, None if answer is None else str(answer))


def holds_template_markers(prompt: str, template_markers: tuple[str, ...]) -> bool:
    """Whether a string prompt is already a conversation rendered by the chat template, so it is not wrapped again."""
    return any(marker in prompt for marker in template_markers)


def required_string(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        raise BadRow(f"missing field '{name}'")
    if not isinstance(value, str):
        raise BadRow(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def check_responses(chosen: str, rejected: str) -> None:
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise BadRow(f"the {side} response is empty")
    if chosen == rejected:
        raise BadRow("chosen and rejected responses are identical, so the pair carries no preference")


def split_hh_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two HH transcripts sharing everything up to the
    last "\\n\\nAssistant:" of the chosen one."""
    marker_at = chosen.rfind(HH_ASSISTANT_MARKER)
    if marker_at < 0:
        raise BadRow("the chosen transcript has no '\\n\\nAssistant:' turn (hh format)")
    prompt = chosen[: marker_at + len(HH_ASSISTANT_MARKER)]
    if not rejected.startswith(prompt):
        raise BadRow(
            "the rejected transcript does not start with the chosen one's prompt "
            "(everything up to the last '\\n\\nAssistant:'), so the pair has no shared prompt"
        )
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def split_message_rows(row: dict, template_markers: tuple[str, ...] = ()) -> tuple[Union[str, Messages], str, str]:
    """(prompt messages, chosen content, rejected content). A response list's earlier turns must be the
    prompt's turns, optionally followed by more context that chosen and rejected share. A string prompt
    already rendered by the template stays raw text, and then there can be no more context."""
    prompt = row.get("prompt")
    if prompt is None:
        raise BadRow("missing field 'prompt'")
    rendered = isinstance(prompt, str) and holds_template_markers(prompt, template_markers)
    prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else checked_messages(prompt, "prompt")
    contexts, contents = [], []
    for side in ("chosen", "rejected"):
        context, content = response_turns(row.get(side), side)
        if context[: len(prompt_messages)] == prompt_messages:
            context = context[len(prompt_messages) :]
        elif context:
            raise BadRow(f"the {side} conversation does not start with the prompt's messages")
        contexts.append(context)
        contents.append(content)
    if contexts[0] != contexts[1]:
        raise BadRow("chosen and rejected conversations differ before their last assistant turn")
    if rendered:
        if contexts[0]:
            raise BadRow(
                "the prompt is a string already rendered by the chat template, so the conversations cannot add turns "
                "after it; give the prompt as a list of messages"
            )
        return prompt, contents[0], contents[1]
    full_prompt = prompt_messages + contexts[0]
    if not full_prompt:
        raise BadRow("the prompt has no messages")
    return full_prompt, contents[0], contents[1]


def response_turns(value: Any, side: str) -> tuple[Messages, str]:
    """(earlier turns, assistant content) of a response given as text, one message or a message list."""
    if value is None:
        raise BadRow(f"missing field '{side}'")
    if isinstance(value, str):
        return [], value
    messages = checked_messages([value] if isinstance(value, dict) else value, side)
    if not messages or messages[-1]["role"] != "assistant":
        raise BadRow(f"'{side}' must end with an assistant message")
    return messages[:-1], messages[-1]["content"]


def checked_messages(value: Any, name: str) -> Messages:
    """A list of {role: str, content: str}, as plain dicts (parquet may add None-valued keys)."""
    if not isinstance(value, list):
        raise BadRow(f"field '{name}' must be a string or a list of {{role, content}} messages, got {type(value).__name__}")
    messages = []
    for position, message in enumerate(value):
        if not (
            isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)
        ):
            raise BadRow(f"field '{name}', message {position}: must be an object with string 'role' and 'content'")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages
