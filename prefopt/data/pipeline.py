"""build_preference_data: the `dataset` config node + a tokenizer -> tokenized train and eval pairs.

    source rows (sources.py) -> normalized rows (formats.py) -> token ids, truncated (tokenize.py)

Each split is read lazily up to its cap (max_train_examples / max_eval_examples), so the cap means
"the first N usable pairs" and a huge split is not tokenized for a short run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig

from prefopt.errors import ConfigError
from prefopt.data.errors import DataError
from prefopt.data.formats import SkippedRows, normalize_rows, resolve_format
from prefopt.data.sources import RawSplit, load_raw_splits
from prefopt.data.tokenize import EncodingCounts, PairEncoder, TokenizedPair

logger = logging.getLogger("prefopt.data")


@dataclass
class PreferenceData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    stats: dict[str, int] = field(default_factory=dict)  # "train/pairs", "train/truncated", "train/boundary_merges", ... and eval/
    row_format: str = "strings"  # the layout the rows had (strings | messages | hh), for logs


def build_preference_data(dataset_cfg: DictConfig, tokenizer, seed: int) -> PreferenceData:
    train_split, eval_split = load_raw_splits(dataset_cfg, seed)
    # arith rows are generated in the strings layout; other sources say theirs, or their rows show it
    row_format = "strings" if dataset_cfg.name == "arith" else resolve_format(dataset_cfg.format, train_split)
    if len(eval_split) and dataset_cfg.name != "arith":
        resolve_format(row_format, eval_split)  # the eval split must have the same columns
    string_prompt_as_user_message = string_prompts_use_chat_template(dataset_cfg.chat_template, row_format, tokenizer)
    # the template is read only where it renders prompts: never for hh transcripts or dataset.chat_template=never
    encoder = PairEncoder(
        tokenizer, dataset_cfg.max_length, dataset_cfg.max_prompt_length, use_chat_template=string_prompt_as_user_message
    )
    stats: dict[str, int] = {}
    splits = {}
    for name, split, limit in (
        ("train", train_split, dataset_cfg.max_train_examples),
        ("eval", eval_split, dataset_cfg.max_eval_examples),
    ):
        splits[name] = prepare_split(
            name, split, row_format, string_prompt_as_user_message, dataset_cfg.on_bad_row, encoder, limit, stats
        )
    if not splits["train"]:
        raise DataError(
            f"{train_split.origin}: no usable training pairs ({stats['train/skipped_bad_rows']} bad rows skipped, "
            f"{stats['train/dropped_empty_response']} dropped by truncation); check the data, dataset.max_train_examples "
            f"and dataset.max_length / dataset.max_prompt_length"
        )
    logger.info("dataset %s (%s rows): %s", dataset_cfg.name, row_format, stats)
    return PreferenceData(train=splits["train"], eval=splits["eval"], stats=stats, row_format=row_format)


def prepare_split(
    name: str,
    split: RawSplit,
    row_format: str,
    string_prompt_as_user_message: bool,
    on_bad_row: str,
    encoder: PairEncoder,
    limit: Optional[int],
    stats: dict[str, int],
) -> list[TokenizedPair]:
    skipped = SkippedRows(split.origin)
    counts = EncodingCounts()
    rows = normalize_rows(split, row_format, string_prompt_as_user_message, on_bad_row, skipped, encoder.user_markers)
    pairs = encoder.encode(rows, limit, split.where, counts)
    skipped.warn()
    stats[f"{name}/pairs"] = len(pairs)
    stats[f"{name}/truncated"] = counts.truncated
    stats[f"{name}/dropped_empty_response"] = counts.dropped_empty_response
    stats[f"{name}/boundary_merges"] = counts.boundary_merges  # prompt/response boundary moved over a merged token
    stats[f"{name}/skipped_bad_rows"] = skipped.count
    return pairs


def string_prompts_use_chat_template(setting: str, row_format: str, tokenizer) -> bool:
    """Whether the chat template renders prompts: a plain-string prompt then becomes one user message
    (unless it is already rendered, see formats.py), and responses end the template's way.

    hh transcripts are raw text by construction; message prompts always need the template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if row_format == "hh":
        return False
    if row_format == "messages":
        if setting == "never" or not has_template:
            reason = "dataset.chat_template=never" if has_template else "the tokenizer has no chat template"
            raise ConfigError(
                f"dataset.format=messages renders prompts with the tokenizer's chat template, but {reason}; "
                f"use dataset.chat_template=auto with a chat model, or give the data as plain strings"
            )
        return True
    if setting == "always" and not has_template:
        raise ConfigError("dataset.chat_template=always but the tokenizer has no chat template; use auto or never")
    return setting == "always" or (setting == "auto" and has_template)
