"""`prefopt data [--pairs N] [OVERRIDES]` (its options: prefopt/cli.py): what a run would train on, without training
it.

Composes the config from the same overrides as `prefopt train` (dataset=..., dataset.path=..., model=...),
builds the pairs exactly as training does (the model's tokenizer, its chat template, truncation, the held-out
split by the seed, the tokenized-pairs cache) and prints the layout found, the counts, where the eval split
comes from, and the first pairs decoded from their token ids, special tokens and all: the text the model
reads. Loads no model weights and creates no run dir (Hydra's compose API: no output dir, no log file).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from prefopt.core.errors import ConfigError
from prefopt.data import PreferenceData, TokenizedPair, build_preference_data
from prefopt.data.identity import data_identity
from prefopt.data.pipeline import string_prompts_use_chat_template
from prefopt.model.loading import load_tokenizer, resolve_model_source
from prefopt.model.naming import model_name
from prefopt.run.config import register_schema, require_values, validate_config
from prefopt.train.onpolicy import cached_onpolicy_samples

SPLIT_STATS = (  # shown per split
    "pairs",
    "skipped_bad_rows",
    "truncated",
    "truncated_share",
    "truncated_prompts",
    "truncated_responses",
    "truncated_by_completion_length",
    "dropped_empty_response",
    "boundary_merges",
)


def compose_run_config(overrides: list[str]) -> DictConfig:
    """The config `prefopt train OVERRIDES` would run (before hardware=auto settles, which the data does not need),
    validated except for its hardware."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    register_schema()
    try:
        with initialize_config_module(config_module="prefopt.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except HydraException as error:  # an unknown group option or key, a malformed override
        raise ConfigError(" ".join(line.strip() for line in str(error).splitlines() if line.strip())) from None
    require_values(cfg)
    validate_config(cfg, hardware=False)  # no model is loaded here: the run's GPUs need not be on this machine
    return cfg


def shown(text: str) -> str:
    """A decoded text as a Python literal: newlines, tabs and edge spaces visible."""
    return repr(text)


def describe_pair(tokenizer, pair: TokenizedPair, label: str) -> list[str]:
    lines = [f"{label} (source row index {pair.source_index})"]
    for part, ids in (("prompt", pair.prompt_ids), ("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        lines.append(f"  {part:<8} {len(ids):>5} tokens | {shown(tokenizer.decode(ids, skip_special_tokens=False))}")
    return lines


def describe_data(cfg: DictConfig, data: PreferenceData, tokenizer, pairs: int) -> str:
    stats, identity = data.stats, data_identity(data)
    lines = [
        f"source   {data.origin}",
        *([f"files    {', '.join(data.files)}"] if data.files else []),
        f"layout   {data.row_format} (dataset.format={cfg.dataset.format})",
        f"tokens   {model_name(cfg.model)} tokenizer; "
        f"chat template {'used' if uses_template(cfg, data, tokenizer) else 'not used'} "
        f"(dataset.chat_template={cfg.dataset.chat_template}); max_length {cfg.dataset.max_length}, "
        f"max_prompt_length {cfg.dataset.max_prompt_length} ({cfg.dataset.truncation_mode}), "
        f"max_completion_length {cfg.dataset.max_completion_length}",
    ]
    for split, origin in (("train", data.origin), ("eval", data.eval_origin)):
        lines.append(
            f"{split:<8} {stats[f'{split}/pairs']} pairs from {origin}: "
            f"{stats[f'{split}/skipped_bad_rows']} bad rows skipped, "
            f"{stats[f'{split}/truncated']} truncated ({stats[f'{split}/truncated_prompts']} with the prompt cut, "
            f"{stats[f'{split}/truncated_responses']} with a response cut, "
            f"{stats[f'{split}/truncated_by_completion_length']} by max_completion_length), "
            f"{stats[f'{split}/dropped_empty_response']} dropped (no response "
            f"token left), {stats[f'{split}/boundary_merges']} boundary merges"
        )
    shown_stats = {f"{split}/{name}" for split in ("train", "eval") for name in SPLIT_STATS}
    others = {key: value for key, value in stats.items() if key not in shown_stats}
    if others:
        lines.append("other    " + ", ".join(f"{key} {value}" for key, value in others.items()))
    if data.eval_origin.endswith("(held-out part)"):
        lines.append(
            f"split    eval = dataset.eval_fraction={cfg.dataset.eval_fraction} of the rows, held out by trainer.seed="
            f"{cfg.trainer.seed}"
        )
    lines.append(f"digest   train {identity['train'][:16]}, eval {identity['eval'][:16]} (what a checkpoint records)")
    lines.append(f"cache    {data.cache}")
    shown_pairs = data.train[:pairs]
    if shown_pairs:
        lines.append(
            f"\nthe first {len(shown_pairs)} training pairs, decoded from their token ids (what the model reads):"
        )
    for number, pair in enumerate(shown_pairs, 1):
        lines.extend(describe_pair(tokenizer, pair, f"train pair {number}"))
    return "\n".join(lines)


def uses_template(cfg: DictConfig, data: PreferenceData, tokenizer) -> bool:
    """Whether the chat template rendered the prompts: the pipeline's own decision for this layout and setting."""
    return string_prompts_use_chat_template(cfg.dataset.chat_template, data.row_format, tokenizer)


class OneLineFormatter(logging.Formatter):
    """A library's log record without the traceback it carries (datasets logs one before prefopt reads a file
    row by row, and the row's own one-line error follows)."""

    def format(self, record: logging.LogRecord) -> str:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return super().format(record)


def log_warnings_in_one_line() -> None:
    """Warnings as `prefopt train` says them: one line each, without the traceback a library attaches."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("[%(name)s][%(levelname)s] %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)


def load_run_data(overrides: list[str]) -> tuple[DictConfig, object, PreferenceData]:
    """(config, tokenizer, pairs) of the run `prefopt train OVERRIDES` would start: composed and validated (but for
    its hardware), the model's tokenizer, and the pairs built as training builds them (through the cache)."""
    cfg = compose_run_config(overrides)
    tokenizer = load_tokenizer(cfg.model, resolve_model_source(cfg.model))
    samples = cached_onpolicy_samples(cfg.model, cfg.dataset, cfg.trainer.seed, tokenizer)  # arith onpolicy
    return cfg, tokenizer, build_preference_data(cfg.dataset, tokenizer, cfg.trainer.seed, samples=samples)
