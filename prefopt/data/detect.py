"""Which layout a dataset has (formats.py lists them), decided once per dataset from its first rows.

Under dataset.format=auto the first object row whose columns fit a layout decides (after dataset.columns
maps the data's own names), so an unreadable first line or one row lacking a column stays a bad row for
dataset.on_bad_row rather than a verdict on the whole file:

    prompt, chosen, rejected all strings        -> strings
    prompt, chosen, rejected, some a list       -> messages
    instruction, chosen, rejected (no prompt)   -> alpaca (LLaMA-Factory's alpaca ranking rows)
    chosen, rejected lists of messages          -> implicit_messages
    chosen, rejected strings with "\\n\\nAssistant:" -> hh
    chosen, rejected other strings              -> implicit

A layout (detected or configured) must then fit at least one of the first PROBE_ROWS rows. If none
does, the layout is wrong for this data, not the rows: the error names the layouts, the columns seen
and the dataset.columns keys, and does not suggest dataset.on_bad_row=skip, which would skip them all.

Columns that look like part of the prompt (system, instruction, input, history, ...) but that the layout
does not read are a warning (unread_prompt_columns), never dropped without a word.
"""

from __future__ import annotations

from typing import Optional

from prefopt.data.columns import ColumnMap
from prefopt.data.errors import BadRow, DataError
from prefopt.data.files import UnreadableRow
from prefopt.data.formats import HH_ASSISTANT_MARKER, normalize_row
from prefopt.data.sources import RawSplit

FORMAT_COLUMNS = {
    "strings": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "messages": ("prompt", "chosen", "rejected"),
    "implicit_messages": ("chosen", "rejected"),
    "alpaca": ("instruction", "chosen", "rejected"),
}
FORMAT_DESCRIPTIONS = {
    "strings": "prompt, chosen, rejected (strings)",
    "implicit": "chosen, rejected (strings: whole texts that start with the same prompt)",
    "hh": "chosen, rejected (full '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts)",
    "messages": "prompt (string or list of {role, content}), chosen, rejected (lists of {role, content} ending with "
    "the assistant turn)",
    "implicit_messages": "chosen, rejected (whole conversations: lists of {role, content} sharing the prompt turns, "
    "each ending with its own assistant turn)",
    "alpaca": "instruction, optional input, system and history, chosen, rejected (strings; LLaMA-Factory's alpaca "
    "ranking rows)",
}
PROMPT_LIKE_COLUMNS = (  # read by some layout, or other tools' names for part of the prompt ("messages" is not:
    "prompt",
    "system",
    "instruction",
    "input",
    "query",
    "question",
    "history",
    "conversations",
    "context",
)  # UltraFeedback's holds the whole chosen conversation, which its prompt and chosen already give)
PROBE_ROWS = 16  # rows a layout is tried on before it is judged wrong for the data
COLUMNS_HINT = (
    "map the data's own columns with dataset.columns.prompt=<column> dataset.columns.chosen=<column> "
    "dataset.columns.rejected=<column> (the prompt may join several: dataset.columns.prompt=[instruction,input])"
)


def resolve_format(configured: str, split: RawSplit, columns: ColumnMap = ColumnMap()) -> str:
    """The configured layout, or the one the rows show (module docstring), checked against the first rows."""
    if not len(split):
        raise DataError(f"{split.origin} has no rows")
    first_object = None
    for _, row in split:
        if not isinstance(row, dict):
            continue
        if first_object is None:
            first_object = row
            check_mapped_columns(columns, row, split.origin)
        try:
            row_format = format_of_columns(configured, columns.apply(row))
        except BadRow:  # a mapped prompt column of the wrong type: a bad row, the next one decides
            continue
        if row_format is not None:
            check_layout_fits(split, row_format, configured, columns, set(first_object))
            return row_format
    if first_object is None:
        first_index, first_row = next(iter(split))
        problem = first_row.problem if isinstance(first_row, UnreadableRow) else f"got {type(first_row).__name__}"
        raise DataError(
            f"{split.origin}: no row is an object with named fields (the first, {split.position(first_index)}: "
            f"{problem})"
        )
    raise layout_error(configured, split.origin, set(first_object))


def format_of_columns(configured: str, row: dict) -> Optional[str]:
    """The layout of a row (the configured one, or detected under auto) if its columns fit it; else None.
    A column holding null counts as absent (a table gives every row every column)."""
    present = {name for name, value in row.items() if value is not None}
    if configured != "auto":
        return configured if set(FORMAT_COLUMNS[configured]) <= present else None
    if set(FORMAT_COLUMNS["strings"]) <= present:
        values = [row[name] for name in FORMAT_COLUMNS["strings"]]
        return "messages" if any(isinstance(value, (list, dict)) for value in values) else "strings"
    if set(FORMAT_COLUMNS["alpaca"]) <= present:
        return "alpaca"
    if {"chosen", "rejected"} <= present:
        if isinstance(row["chosen"], (list, dict)) or isinstance(row["rejected"], (list, dict)):
            return "implicit_messages"
        return "hh" if HH_ASSISTANT_MARKER in str(row["chosen"]) else "implicit"
    return None


def check_mapped_columns(columns: ColumnMap, row: dict, origin: str) -> None:
    """Every column dataset.columns names must be in the data."""
    for name, key in columns.sources().items():
        if name not in row:
            raise DataError(
                f"{origin}: {key} names column '{name}', which the data does not have (its columns: "
                f"{', '.join(sorted(row)) or '(none)'}); fix {key}"
            )


def check_layout_fits(split: RawSplit, row_format: str, configured: str, columns: ColumnMap, seen: set) -> None:
    """At least one of the first PROBE_ROWS object rows of the data must make a pair in this layout (module
    docstring). The data's first rows, not the split's: which rows are held out must not decide the layout."""
    problems: dict[str, list[str]] = {}  # problem -> positions of the rows that have it
    tried = 0
    for index in range(len(split.rows)):
        row = split.rows[index]
        if not isinstance(row, dict):
            continue
        try:
            # as templated: whether the rows' system / history turns can be rendered is the tokenizer's question, asked
            # later
            normalize_row(index, row, row_format, string_prompt_as_user_message=True, columns=columns)
            return
        except BadRow as bad:
            problems.setdefault(str(bad), []).append(split.position(index))
        tried = sum(len(positions) for positions in problems.values())
        if tried == PROBE_ROWS:
            break
    how = f"dataset.format={row_format}" + (" (detected)" if configured == "auto" else "")
    examples = "; ".join(
        f"{positions[0]}{f' and {len(positions) - 1} more' if len(positions) > 1 else ''}: {problem}"
        for problem, positions in list(problems.items())[:3]
    )
    raise layout_error(
        configured, split.origin, seen, f"With {how}, none of the first {tried} rows makes a pair ({examples}). "
    )


def layout_error(configured: str, origin: str, columns: set, finding: str = "") -> DataError:
    expected = "; ".join(f"{name}: {FORMAT_DESCRIPTIONS[name]}" for name in FORMAT_COLUMNS)
    wanted = f"dataset.format={configured} expects {FORMAT_DESCRIPTIONS[configured]}. " if configured != "auto" else ""
    return DataError(
        f"{origin}: the rows do not fit a preference layout. {finding}Found: "
        f"{', '.join(sorted(columns)) or '(no columns)'} (the data's columns). Expected, per format (dataset.format): "
        f"{expected}. {wanted}Rename the columns, {COLUMNS_HINT}, or set dataset.format to the layout the data has"
    )


def unread_prompt_columns(split: RawSplit, row_format: str, templated: bool, columns: ColumnMap) -> Optional[str]:
    """A warning naming the columns that look like part of the prompt (PROMPT_LIKE_COLUMNS) and hold text in the
    first PROBE_ROWS rows, but that this layout does not read; None when there are none."""
    read = {"chosen", "rejected", "answer", *columns.sources()}
    if row_format in ("strings", "messages"):
        read.add("prompt")
    if row_format == "messages" and not columns.prompt:
        read.add("conversations")  # the prompt of rows without one (columns.py)
    if row_format == "alpaca":
        read |= {"instruction", "input", "history"}
    if row_format in ("messages", "implicit_messages", "alpaca") or (row_format == "strings" and templated):
        read.add("system")  # formats.with_system_turn
    unread: dict[str, None] = {}
    rows = [split.rows[index] for index in range(min(len(split.rows), PROBE_ROWS))]
    for row in rows:
        if isinstance(row, dict):
            unread.update(
                (name, None)
                for name, value in row.items()
                if name in PROMPT_LIKE_COLUMNS and name not in read and value not in (None, "", [])
            )
    if not unread:
        return None
    names = ", ".join(unread)
    system_hint = (
        " (a system column is read only where the chat template renders the prompt)" if "system" in unread else ""
    )
    return (
        f"{split.origin}: column(s) {names} look like part of the prompt, but dataset.format={row_format} does not "
        f"read them{system_hint}; map them with dataset.columns.prompt=[...] (columns joined by newlines), set "
        "dataset.format, or remove them from the data"
    )
