"""Row layouts -> one normalized `PreferenceRow`; malformed rows are errors (or skipped and counted).

The layouts (`dataset.format`, or detected under `auto` by detect.py), TRL's four and HH's:
  strings           : {prompt: str, chosen: str, rejected: str}                  (TRL: standard, explicit prompt)
  implicit          : {chosen: str, rejected: str}, full texts that share the prompt as a prefix (TRL: standard,
                      implicit prompt). The prompt is the shared text up to the last word boundary before the two
                      differ; the whitespace there starts the responses (" yes" / " no"), as BPE vocabularies
                      tokenize a word mid-text.
  hh                : {chosen: str, rejected: str}, "\n\nHuman: ...\n\nAssistant: ..." transcripts (HH-RLHF, an implicit
                      layout with a rule of its own): the prompt is everything up to and including the last
                      "\n\nAssistant:" of the chosen transcript, so it ends on the marker exactly as HH's own
                      prompts do, and the space after it stays with the response.
  messages          : {prompt: str | [{role, content}], chosen / rejected: [{role, content}] ending with the
                      assistant turn} (TRL: conversational, explicit prompt). Lists that repeat the prompt turns
                      (UltraFeedback's do) are stripped of them.
  implicit_messages : {chosen / rejected: [{role, content}]}, whole conversations (TRL: conversational, implicit
                      prompt): the prompt is the messages both share from the start, each response the one
                      assistant message after them.
  alpaca            : {instruction: str, input: str (optional), chosen: str, rejected: str, system: str (optional),
                      history: [[user, assistant], ...] (optional)}: LLaMA-Factory's alpaca ranking rows. The
                      user turn is instruction + "\n" + input (input left out when empty), as LLaMA-Factory's
                      AlpacaDatasetConverter joins them; history pairs become the earlier user/assistant turns and
                      system the system turn, so a row that has either needs the chat template (else a bad row).
Messages may also be written {from, value} (ShareGPT, LLaMA-Factory): human -> user, gpt -> assistant.
LLaMA-Factory's sharegpt ranking rows {conversations, chosen, rejected} read as messages: a row without a
prompt column takes `conversations` as its prompt (columns.py).
A `system` column (a string) becomes the system turn wherever the prompt is messages (messages,
implicit_messages, alpaca, and strings under the chat template); detect.py warns about one left unread.
dataset.columns maps the data's own column names onto prompt / chosen / rejected first (columns.py).
Rows in the strings and message layouts may carry an optional `answer` column: a reference answer for greedy eval.

A plain-string prompt is templated once at most. Where the chat template is in use, it becomes one user
message for the template, unless it already holds the markers the template writes to open a user turn
(`<|im_start|>`, `<|start_header_id|>`, `[INST]`, ...: the tokenizer's TemplateTurns.user_markers): then
it is already a rendered conversation and stays raw text, used as is (tokenize.py ends its responses
the template's way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from prefopt.data.columns import ColumnMap
from prefopt.data.errors import BadRow, bad_row_error
from prefopt.data.files import UnreadableRow
from prefopt.data.sources import RawSplit

HH_ASSISTANT_MARKER = "\n\nAssistant:"
CONVERSATIONAL = ("messages", "implicit_messages")  # layouts whose prompts the chat template renders
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # {from, value} messages
Messages = list  # [{"role": str, "content": str}, ...]


@dataclass
class PreferenceRow:
    source_index: int  # 0-based position in the source's rows (RawSplit.indices); messages show RawSplit.position
    prompt: Union[str, Messages]  # raw text (used as is), or messages to render with the chat template
    chosen: str  # response text, without EOS
    rejected: str
    answer: Optional[str] = None  # reference answer for greedy-accuracy eval


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

    def warning(self) -> Optional[str]:
        """What the log says about the skipped rows (kept with cached pairs, so every run says it); None: none
        skipped."""
        if not self.count:
            return None
        return f"{self.origin}: skipped {self.count} bad rows, e.g. {'; '.join(self.examples)}"


def normalize_rows(
    split: RawSplit,
    row_format: str,
    string_prompt_as_user_message: bool,
    on_bad_row: str,
    skipped: SkippedRows,
    template_markers: tuple[str, ...] = (),
    columns: ColumnMap = ColumnMap(),
) -> Iterator[PreferenceRow]:
    """Normalized rows, lazily (a capped split stops reading early). Bad rows raise or go to `skipped`.
    template_markers: what marks a string prompt as already rendered by the chat template (module docstring)."""
    for index, row in split:
        try:
            normalized = normalize_row(index, row, row_format, string_prompt_as_user_message, template_markers, columns)
        except BadRow as bad:
            if on_bad_row == "error":
                raise bad_row_error(split.where(index), str(bad)) from None
            skipped.add(split.position(index), str(bad))
            continue
        yield normalized


def normalize_row(
    source_index: int,
    row: Any,
    row_format: str,
    string_prompt_as_user_message: bool,
    template_markers: tuple[str, ...] = (),
    columns: ColumnMap = ColumnMap(),
) -> PreferenceRow:
    if isinstance(row, UnreadableRow):
        raise BadRow(row.problem)
    if not isinstance(row, dict):
        raise BadRow(f"a row must be an object with named fields, got {type(row).__name__}")
    row = columns.apply(row)
    if row_format == "hh":
        prompt, chosen, rejected = split_hh_transcripts(
            required_string(row, "chosen"), required_string(row, "rejected")
        )
    elif row_format == "implicit":
        prompt, chosen, rejected = split_shared_text(required_string(row, "chosen"), required_string(row, "rejected"))
    elif row_format == "strings":
        prompt = required_string(row, "prompt")
        chosen, rejected = required_string(row, "chosen"), required_string(row, "rejected")
        if string_prompt_as_user_message and not holds_template_markers(prompt, template_markers):
            prompt = [{"role": "user", "content": prompt}]
    elif row_format == "messages":
        prompt, chosen, rejected = split_message_rows(row, template_markers)
    elif row_format == "implicit_messages":
        prompt, chosen, rejected = split_conversations(row)
    elif row_format == "alpaca":
        prompt = alpaca_prompt(row, string_prompt_as_user_message)
        chosen, rejected = required_string(row, "chosen"), required_string(row, "rejected")
    else:
        raise ValueError(f"unknown row format {row_format!r}")
    if isinstance(prompt, list):
        prompt = with_system_turn(row, prompt)
    check_responses(chosen, rejected)
    answer = row.get("answer") if row_format not in ("hh", "implicit") else None
    return PreferenceRow(source_index, prompt, chosen, rejected, None if answer is None else str(answer))


ALPACA_JOINER = (
    "\n"  # between instruction and input: LLaMA-Factory's AlpacaDatasetConverter writes "\n".join([instruction, input])
)


def alpaca_prompt(row: dict, templated: bool) -> Union[str, Messages]:
    """The prompt of a LLaMA-Factory alpaca ranking row (module docstring): a string, or messages where the
    chat template is in use (a system turn, if any, is added by with_system_turn)."""
    instruction = required_string(row, "instruction")
    query = row.get("input")
    if query is not None and not isinstance(query, str):
        raise BadRow(f"field 'input' must be a string, got {type(query).__name__}")
    user = ALPACA_JOINER.join(part for part in (instruction, query) if part)
    if not user.strip():
        raise BadRow("the instruction is empty")
    turns = history_turns(row.get("history"))
    system = row.get("system")
    if not templated:
        if turns or system:
            which = " and ".join(
                name for name, value in (("history turns", turns), ("a system prompt", system)) if value
            )
            raise BadRow(
                f"the row has {which}, which only a chat template can render; use a model whose tokenizer has one "
                f"(with dataset.chat_template=auto or always), or remove the column"
            )
        return user
    return turns + [{"role": "user", "content": user}]


def history_turns(history: Any) -> Messages:
    """LLaMA-Factory's history, [[user, assistant], ...], as the earlier turns of the conversation."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise BadRow(f"field 'history' must be a list of [user, assistant] pairs, got {type(history).__name__}")
    turns = []
    for position, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(text, str) for text in turn)):
            raise BadRow(f"field 'history', item {position}: must be a pair of strings [user, assistant]")
        turns += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return turns


def with_system_turn(row: dict, prompt: Messages) -> Messages:
    """The prompt messages with the row's `system` column (LLaMA-Factory's) as the system turn in front."""
    system = row.get("system")
    if system is None or system == "":
        return prompt
    if not isinstance(system, str):
        raise BadRow(f"field 'system' must be a string, got {type(system).__name__}")
    if prompt and prompt[0]["role"] == "system":
        if prompt[0]["content"] != system:
            raise BadRow("the 'system' column and the prompt's own system message differ; keep one of them")
        return prompt
    return [{"role": "system", "content": system}] + prompt


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


def split_shared_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two texts sharing a prefix (the implicit layout): the
    prompt ends at the last word boundary before they differ, so no word is cut in two; the whitespace
    there starts both responses."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    boundary = next((at for at in range(shared - 1, -1, -1) if chosen[at].isspace()), 0)
    while boundary > 0 and chosen[boundary - 1].isspace():
        boundary -= 1
    prompt = chosen[:boundary]
    if not prompt.strip():
        raise BadRow(
            "chosen and rejected share no prompt (no common text before the word where they differ); "
            "give the prompt in a column of its own (dataset.columns.prompt=<column>)"
        )
    return prompt, chosen[boundary:], rejected[boundary:]


def split_message_rows(row: dict, template_markers: tuple[str, ...] = ()) -> tuple[Union[str, Messages], str, str]:
    """(prompt messages, chosen content, rejected content). A response list's earlier turns must be the
    prompt's turns, optionally followed by more context that chosen and rejected share. A string prompt
    already rendered by the template stays raw text, and then there can be no more context."""
    prompt = row.get("prompt")
    if prompt is None:
        raise BadRow("missing field 'prompt'")
    rendered = isinstance(prompt, str) and holds_template_markers(prompt, template_markers)
    prompt_messages = (
        [{"role": "user", "content": prompt}] if isinstance(prompt, str) else checked_messages(prompt, "prompt")
    )
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


def split_conversations(row: dict) -> tuple[Messages, str, str]:
    """(prompt messages, chosen content, rejected content) of two whole conversations (the implicit_messages
    layout): the prompt is the messages both share from the start; after it each side must hold exactly
    one assistant message, its response."""
    sides = {}
    for side in ("chosen", "rejected"):
        value = row.get(side)
        if value is None:
            raise BadRow(f"missing field '{side}'")
        sides[side] = checked_messages(value, side)
    chosen, rejected = sides["chosen"], sides["rejected"]
    if chosen == rejected:
        raise BadRow("chosen and rejected conversations are identical, so the pair carries no preference")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if not shared:
        raise BadRow("chosen and rejected conversations share no prompt messages (they differ from the first message)")
    contents = []
    for side, messages in sides.items():
        tail = messages[shared:]
        if len(tail) != 1 or tail[0]["role"] != "assistant":
            roles = ", ".join(message["role"] for message in tail) or "nothing"
            raise BadRow(
                f"after the {shared} messages chosen and rejected share, '{side}' must hold one assistant message, "
                f"but holds: {roles}"
            )
        contents.append(tail[0]["content"])
    return chosen[:shared], contents[0], contents[1]


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
    """A list of {role: str, content: str}, as plain dicts (parquet may add None-valued keys; {from, value}
    messages are read as ShareGPT writes them)."""
    if not isinstance(value, list):
        raise BadRow(
            f"field '{name}' must be a string or a list of {{role, content}} messages, got {type(value).__name__}"
        )
    messages = []
    for position, message in enumerate(value):
        if isinstance(message, dict) and message.get("role") is None and isinstance(message.get("from"), str):
            message = {"role": SHAREGPT_ROLES.get(message["from"], message["from"]), "content": message.get("value")}
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise BadRow(
                f"field '{name}', message {position}: must be an object with string 'role' and 'content' (or 'from' "
                "and 'value')"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages
