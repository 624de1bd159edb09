"""build_preference_data: the `dataset` config node + a tokenizer -> tokenized train and eval pairs.

    source rows (sources.py) -> layout (detect.py) -> normalized rows (formats.py) -> token ids, truncated (tokenize.py)
                                  \\-> the tokenized pairs cache (cache.py): a hit skips all but the first step

Each split is read lazily up to its cap (max_train_examples / max_eval_examples), so the cap means
"the first N usable pairs" and a huge split is not tokenized for a short run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.core.fileutil import file_digests
from prefopt.data.cache import Splits, cache_key, cached_pairs, indices_digest, tokenizer_fingerprint
from prefopt.data.columns import ColumnMap
from prefopt.data.detect import resolve_format, unread_prompt_columns
from prefopt.data.errors import DataError
from prefopt.data.formats import CONVERSATIONAL, SkippedRows, normalize_rows
from prefopt.data.sources import RawSource, RawSplit, load_raw_splits
from prefopt.data.tokenize import EncodingCounts, PairEncoder, TokenizedPair
from prefopt.data.truncation import TruncationLimits, truncated_share, truncation_warnings

logger = logging.getLogger("prefopt.data")


@dataclass
class PreferenceData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    stats: dict[str, float] = field(
        default_factory=dict
    )  # counts "train/pairs", "train/truncated", "train/boundary_merges", ..., the share "train/truncated_share"; eval/
    row_format: str = (
        "strings"  # the layout the rows had (formats.py: strings | implicit | hh | messages | implicit_messages)
    )
    cache: str = "off"  # hit | miss (tokenized now, then cached) | off (dataset.cache_dir=null, or generated data)
    origin: str = (
        ""  # where the training pairs came from ("file /x/pairs.jsonl (train part)"): names the data in messages
    )
    eval_origin: str = ""  # where the eval pairs came from (a held-out part, or a split of its own)
    files: Optional[list[str]] = None  # the local files read (None: hub or generated data)


def build_preference_data(
    dataset_cfg: DictConfig,
    tokenizer,
    seed: int,
    announce: bool = True,
    samples: Optional[Sequence[Sequence[str]]] = None,
) -> PreferenceData:
    """announce: log the data's warnings and summary line (False on all ranks but 0: said once per run). samples:
    the model's samples per arith question (dataset.arith.rejected_style=onpolicy, train/onpolicy.py)."""
    source = load_raw_splits(dataset_cfg, seed, samples)
    entry = cache_entry(dataset_cfg, source, tokenizer)
    if entry is None:
        splits, meta = tokenize_source(dataset_cfg, source, tokenizer)
        cache = "off"
    else:
        splits, meta, hit = cached_pairs(*entry, lambda: tokenize_source(dataset_cfg, source, tokenizer))
        cache = "hit" if hit else "miss"
        if announce:
            logger.info("tokenized pairs: cache %s (%s)", cache, entry[0])
    stats = meta["stats"] | onpolicy_stats(source)
    if announce:  # said on every run, cached or not; the truncation warnings follow dataset.warn_truncated_share
        for warning in meta["warnings"] + truncation_warnings(stats, dataset_cfg) + onpolicy_warnings(source):
            logger.warning("%s", warning)
    if not splits["train"]:
        raise DataError(
            f"{source.train.origin}: no usable training pairs ({stats['train/skipped_bad_rows']} bad rows skipped, "
            f"{stats['train/dropped_empty_response']} dropped by truncation); check the data, "
            "dataset.max_train_examples and dataset.max_length / dataset.max_prompt_length"
        )
    if announce:
        logger.info(
            "dataset %s (%s rows; train: %s; eval: %s): %s",
            dataset_cfg.name,
            meta["row_format"],
            source.train.origin,
            source.eval.origin,
            stats,
        )
    return PreferenceData(
        train=splits["train"],
        eval=splits["eval"],
        stats=stats,
        row_format=meta["row_format"],
        cache=cache,
        origin=source.train.origin,
        eval_origin=source.eval.origin,
        files=[str(path) for path in source.files] if source.files is not None else None,
    )


def onpolicy_stats(source: RawSource) -> dict[str, int]:
    """<split>/onpolicy_all_correct and <split>/onpolicy_no_usable_sample (questions without a pair), and
    <split>/onpolicy_chosen_sampled."""
    counts = source.onpolicy or {}
    return {
        f"{split}/onpolicy_{name}": getattr(count, name)
        for split, count in counts.items()
        for name in ("all_correct", "no_usable_sample", "chosen_sampled")
    }


def onpolicy_warnings(source: RawSource) -> list[str]:
    """Questions the on-policy regime could not make a pair of: the split is that much smaller than asked."""
    warnings = []
    for split, count in (source.onpolicy or {}).items():
        if count.dropped_questions:
            shown = ", ".join(repr(prompt) for prompt in count.dropped_questions[:3])
            warnings.append(
                f"arith onpolicy: {len(count.dropped_questions)} {split} questions give no pair ({count.all_correct} "
                f"answered right in every usable sample, {count.no_usable_sample} had no sample that ended in time; "
                f"e.g. {shown}), so the split is that much smaller; more dataset.arith.onpolicy.samples (or "
                "max_new_tokens) make fewer such questions"
            )
    return warnings


def cache_entry(dataset_cfg: DictConfig, source: RawSource, tokenizer) -> Optional[tuple[Path, str]]:
    """(entry path, key) of the tokenized pairs cache (cache.py), or None where nothing is cached."""
    cache_dir = dataset_cfg.get("cache_dir")
    if not cache_dir or (source.files is None and source.fingerprint is None):
        return None
    cache_dir = Path(os.path.expanduser(cache_dir))
    content = (
        file_digests(source.files, cache_dir / "data_digests.json") if source.files is not None else source.fingerprint
    )
    settings = OmegaConf.to_container(dataset_cfg, resolve=True)
    for unrelated in ("cache_dir", "warn_truncated_share"):  # where the cache lives; when a warning is said
        settings.pop(unrelated, None)
    key = cache_key(
        {
            "data": content,
            "splits": {
                name: [split.origin, indices_digest(split.indices)]
                for name, split in (("train", source.train), ("eval", source.eval))
            },
            "dataset": settings,
            "tokenizer": tokenizer_fingerprint(tokenizer),
        }
    )
    return cache_dir / f"pairs-{key}.pt", key


def tokenize_source(dataset_cfg: DictConfig, source: RawSource, tokenizer) -> tuple[Splits, dict]:
    """(pairs per split, meta: row_format, stats and the warnings to repeat on every run)."""
    columns = ColumnMap.from_config(dataset_cfg.get("columns"))
    # arith rows are generated in the strings layout; other sources say theirs, or their rows show it
    generated = dataset_cfg.name == "arith"
    row_format = "strings" if generated else resolve_format(dataset_cfg.format, source.train, columns)
    if len(source.eval) and not generated and source.eval.rows is not source.train.rows:
        resolve_format(row_format, source.eval, columns)  # a split of its own must have the same layout
    string_prompt_as_user_message = string_prompts_use_chat_template(dataset_cfg.chat_template, row_format, tokenizer)
    warnings: list[str] = []
    unread = (
        None if generated else unread_prompt_columns(source.train, row_format, string_prompt_as_user_message, columns)
    )
    if unread:
        warnings.append(unread)
    # the template is read only where it renders prompts: never for raw text (hh, implicit) or
    # dataset.chat_template=never
    encoder = PairEncoder(
        tokenizer, TruncationLimits.from_config(dataset_cfg), use_chat_template=string_prompt_as_user_message
    )
    stats: dict[str, float] = {}
    splits = {}
    for name, split, limit in (
        ("train", source.train, dataset_cfg.max_train_examples),
        ("eval", source.eval, dataset_cfg.max_eval_examples),
    ):
        splits[name] = prepare_split(
            name,
            split,
            row_format,
            string_prompt_as_user_message,
            dataset_cfg.on_bad_row,
            encoder,
            limit,
            stats,
            warnings,
            columns,
        )
    count_overlap(splits, source.eval.origin, stats, warnings)
    return splits, {"row_format": row_format, "stats": stats, "warnings": warnings}


def count_overlap(splits: Splits, eval_origin: str, stats: dict[str, int], warnings: list[str]) -> None:
    """eval/overlap_with_train: eval pairs whose prompt, chosen and rejected text is also a train pair (exact
    duplicates in the data land on both sides of a held-out split, and public splits share rows too)."""
    train = {(pair.prompt, pair.chosen, pair.rejected) for pair in splits["train"]}
    overlap = sum((pair.prompt, pair.chosen, pair.rejected) in train for pair in splits["eval"])
    stats["eval/overlap_with_train"] = overlap
    if overlap:
        warnings.append(
            f"{eval_origin}: {overlap} of {len(splits['eval'])} eval pairs are also train pairs (the same prompt, "
            "chosen and rejected text), so eval metrics partly measure memorized pairs; remove the duplicates from "
            "the data"
        )


def prepare_split(
    name: str,
    split: RawSplit,
    row_format: str,
    string_prompt_as_user_message: bool,
    on_bad_row: str,
    encoder: PairEncoder,
    limit: Optional[int],
    stats: dict[str, float],
    warnings: list[str],
    columns: ColumnMap,
) -> list[TokenizedPair]:
    skipped = SkippedRows(split.origin)
    counts = EncodingCounts()
    rows = normalize_rows(
        split, row_format, string_prompt_as_user_message, on_bad_row, skipped, encoder.user_markers, columns
    )
    pairs = encoder.encode(rows, limit, split.where, counts)
    if skipped.warning():
        warnings.append(skipped.warning())
    stats[f"{name}/pairs"] = len(pairs)
    stats[f"{name}/truncated"] = counts.truncated
    stats[f"{name}/truncated_share"] = truncated_share(counts.truncated, len(pairs))
    stats[f"{name}/truncated_prompts"] = counts.truncated_prompts
    stats[f"{name}/truncated_responses"] = counts.truncated_responses
    stats[f"{name}/truncated_by_completion_length"] = counts.truncated_by_completion_length
    stats[f"{name}/dropped_empty_response"] = counts.dropped_empty_response
    stats[f"{name}/boundary_merges"] = counts.boundary_merges  # prompt/response boundary moved over a merged token
    stats[f"{name}/skipped_bad_rows"] = skipped.count
    return pairs


def string_prompts_use_chat_template(setting: str, row_format: str, tokenizer) -> bool:
    """Whether the chat template renders prompts: a plain-string prompt then becomes one user message
    (unless it is already rendered, see formats.py), and responses end the template's way.

    hh transcripts and implicit-prompt texts are raw text by construction; message prompts always need the template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if row_format in ("hh", "implicit"):
        return False
    if row_format in CONVERSATIONAL:
        if setting == "never" or not has_template:
            reason = "dataset.chat_template=never" if has_template else "the tokenizer has no chat template"
            raise ConfigError(
                f"dataset.format={row_format} renders prompts with the tokenizer's chat template, but {reason}; "
                f"use dataset.chat_template=auto with a chat model, or give the data as plain strings"
            )
        return True
    if setting == "always" and not has_template:
        raise ConfigError("dataset.chat_template=always but the tokenizer has no chat template; use auto or never")
    return setting == "always" or (setting == "auto" and has_template)
