"""dataset.columns: the data's own names for the prompt, chosen and rejected columns.

How other tools' settings map (a column left null keeps its own name):
    TRL              prompt / chosen / rejected already: nothing to map
    OpenRLHF         --prompt_key P --chosen_key C --rejected_key R
                     -> dataset.columns.prompt=P dataset.columns.chosen=C dataset.columns.rejected=R
    LLaMA-Factory    alpaca preference data {instruction, input, chosen, rejected}
                     -> dataset.columns.prompt=[instruction,input]: several columns, joined by a newline
                        (empty ones left out), as LLaMA-Factory joins instruction and input
                     (read as they are too: dataset.format=alpaca, detected; formats.py)
                     sharegpt preference data {conversations, chosen, rejected} with {from, value} messages
                     -> nothing to map: a row without a prompt column takes `conversations` as its prompt
                        (formats.py reads {from, value} messages)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from prefopt.core.errors import ConfigError
from prefopt.data.errors import BadRow

SHAREGPT_PROMPT = "conversations"  # LLaMA-Factory's sharegpt rows keep the prompt messages there
PROMPT_JOINER = "\n"  # between the columns of a several-column prompt (LLaMA-Factory's instruction + input)


@dataclass(frozen=True)
class ColumnMap:
    prompt: tuple[str, ...] = ()  # source columns of the prompt; () keeps a column named "prompt"
    chosen: Optional[str] = None  # source column of the chosen response; None keeps "chosen"
    rejected: Optional[str] = None  # source column of the rejected response; None keeps "rejected"

    @classmethod
    def from_config(cls, columns: Any) -> "ColumnMap":
        """The dataset.columns node, checked (a ConfigError names the key)."""
        if columns is None:
            return cls()
        prompt = columns.get("prompt")
        names = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
        if not all(isinstance(name, str) and name for name in names) or (prompt is not None and not names):
            raise ConfigError(
                f"dataset.columns.prompt={prompt!r} must be a column name or a list of them "
                f"(dataset.columns.prompt=[instruction,input] joins several with a newline)"
            )
        for key in ("chosen", "rejected"):
            value = columns.get(key)
            if value is not None and not (isinstance(value, str) and value):
                raise ConfigError(f"dataset.columns.{key}={value!r} must be a column name (or null to keep '{key}')")
        return cls(tuple(names), columns.get("chosen"), columns.get("rejected"))

    def sources(self) -> dict[str, str]:
        """Each mapped source column -> the key that names it ("dataset.columns.prompt")."""
        named = {name: "dataset.columns.prompt" for name in self.prompt}
        for key in ("chosen", "rejected"):
            if getattr(self, key) is not None:
                named[getattr(self, key)] = f"dataset.columns.{key}"
        return named

    def apply(self, row: dict) -> dict:
        """The row with prompt / chosen / rejected taken from the mapped columns (unmapped ones as they are);
        without a prompt column, LLaMA-Factory's sharegpt `conversations` is the prompt."""
        if not self.prompt and row.get("prompt") is None and isinstance(row.get(SHAREGPT_PROMPT), list):
            row = {**row, "prompt": row[SHAREGPT_PROMPT]}
        if not (self.prompt or self.chosen or self.rejected):
            return row
        mapped = dict(row)
        for key in ("chosen", "rejected"):
            if getattr(self, key) is not None:
                mapped[key] = row.get(getattr(self, key))
        if len(self.prompt) == 1:
            mapped["prompt"] = row.get(self.prompt[0])
        elif self.prompt:
            mapped["prompt"] = self.joined_prompt(row)
        return mapped

    def joined_prompt(self, row: dict) -> Optional[str]:
        parts = []
        for name in self.prompt:
            value = row.get(name)
            if value is not None and not isinstance(value, str):
                raise BadRow(f"column '{name}' (dataset.columns.prompt) must be a string, got {type(value).__name__}")
            if value:
                parts.append(value)
        return PROMPT_JOINER.join(parts) if parts else None
