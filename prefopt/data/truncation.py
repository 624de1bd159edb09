"""How a pair too long for its limits is cut, with TRL's names for the limits, and what a run is told about it.

A pair is cut in this order (dataset.* keys):
  1. max_completion_length (null = no limit of its own): each response keeps its first N tokens, as TRL's
     DPOConfig.max_completion_length did (TRL 0.13 up to 1.0: completions cut apart from the prompt, start kept).
  2. max_length, for a pair whose prompt plus longer response exceeds it: the prompt is cut to max_prompt_length,
     keeping its end (truncation_mode=keep_end: the last turn and the template's assistant header the response
     follows; a leading BOS stays, the model never saw text without it) or its start (keep_start). This is TRL's
     DPOTrainer up to 0.11 (prompt cut first, by truncation_mode) and what prefopt did before the key existed
     (keep_end), so the default changes no pair.
  3. then each response keeps its first max_length - prompt tokens: a cut response loses its end-of-turn token.
Both responses of a pair share one prompt, so chosen and rejected always see the same prompt tokens.

TRL 1.x (1.16 read) dropped max_prompt_length and max_completion_length: it cuts each whole prompt+response
sequence to max_length, keep_start (its default: the response's end goes, and a pair whose prompt alone fills
max_length is dropped) or keep_end (deprecated: the sequence's start goes, prompt first). Where a pair's prompt
fits max_prompt_length, prefopt's cut equals TRL 1.x keep_start's (scripts/trl_truncation_check.py); so
keep_start with max_prompt_length = max_length - 1 gives every pair TRL 1.x keeps the same tokens.

A pair left with an empty response (no limit a valid config allows does this) is dropped, counted and warned about.
A split whose truncated share exceeds dataset.warn_truncated_share gets one warning line per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

KEEP_END = "keep_end"  # cut the prompt's start (TRL 0.x's default; prefopt's since it began)
KEEP_START = "keep_start"  # cut the prompt's end
TRUNCATION_MODES = (KEEP_END, KEEP_START)


@dataclass(frozen=True)
class TruncationLimits:
    max_length: int  # prompt + longer response
    max_prompt_length: int  # what the prompt is cut to when the pair exceeds max_length
    max_completion_length: Optional[int] = None  # each response, before max_length applies; None = no own limit
    mode: str = KEEP_END  # which end of a cut prompt is kept

    @classmethod
    def from_config(cls, dataset_cfg) -> "TruncationLimits":
        return cls(
            dataset_cfg.max_length,
            dataset_cfg.max_prompt_length,
            dataset_cfg.max_completion_length,
            dataset_cfg.truncation_mode,
        )


@dataclass(frozen=True)
class CutPair:
    """A pair after truncation, and what was cut."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_cut: bool = False  # the prompt lost tokens (to max_prompt_length, the pair exceeding max_length)
    responses_cut: bool = False  # a response lost its end (to max_completion_length or max_length)
    by_completion_length: bool = False  # a response was longer than max_completion_length

    @property
    def truncated(self) -> bool:
        return self.prompt_cut or self.responses_cut


def cut_prompt(prompt_ids: list[int], limits: TruncationLimits, bos_id: Optional[int]) -> list[int]:
    """The prompt cut to max_prompt_length tokens, keeping the end the mode names (and a leading BOS)."""
    keep = limits.max_prompt_length
    if len(prompt_ids) <= keep:
        return prompt_ids
    if limits.mode == KEEP_START:
        return prompt_ids[:keep]
    if bos_id is not None and prompt_ids[0] == bos_id:
        return prompt_ids[:1] + prompt_ids[len(prompt_ids) - (keep - 1) :]
    return prompt_ids[len(prompt_ids) - keep :]


def truncate_pair(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    limits: TruncationLimits,
    bos_id: Optional[int],
) -> Optional[CutPair]:
    """The pair cut to its limits (module docstring), or None when a response would be left empty."""
    longest = max(len(chosen_ids), len(rejected_ids))
    by_completion_length = limits.max_completion_length is not None and longest > limits.max_completion_length
    if by_completion_length:
        chosen_ids = chosen_ids[: limits.max_completion_length]
        rejected_ids = rejected_ids[: limits.max_completion_length]
    if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) <= limits.max_length:
        return CutPair(prompt_ids, chosen_ids, rejected_ids, False, by_completion_length, by_completion_length)
    kept_prompt = cut_prompt(prompt_ids, limits, bos_id)
    response_budget = max(limits.max_length - len(kept_prompt), 0)
    if not response_budget or not chosen_ids or not rejected_ids:
        return None
    responses_cut = by_completion_length or max(len(chosen_ids), len(rejected_ids)) > response_budget
    return CutPair(
        kept_prompt,
        chosen_ids[:response_budget],
        rejected_ids[:response_budget],
        len(kept_prompt) < len(prompt_ids),
        responses_cut,
        by_completion_length,
    )


def truncated_share(truncated: int, pairs: int) -> float:
    """The share of a split's pairs that were cut, as logged (data/train/truncated_share)."""
    return round(truncated / pairs, 4) if pairs else 0.0


def truncation_warnings(stats: dict, dataset_cfg) -> list[str]:
    """One line per split that had pairs dropped for an empty response, or more than dataset.warn_truncated_share
    of its pairs truncated."""
    lines = []
    for split in ("train", "eval"):
        dropped = stats.get(f"{split}/dropped_empty_response", 0)
        if dropped:
            lines.append(
                f"{dropped} {split} pairs were dropped: truncation left a response without a token; raise "
                "dataset.max_length or lower dataset.max_prompt_length"
            )
        share = stats.get(f"{split}/truncated_share", 0.0)
        if share > dataset_cfg.warn_truncated_share:
            lines.append(truncated_share_warning(split, stats, dataset_cfg))
    return lines


def truncated_share_warning(split: str, stats: dict, dataset_cfg) -> str:
    """'87% of train pairs (21/24) were truncated: ...': what was cut, by which keys, and what to change."""
    prompts, responses = stats[f"{split}/truncated_prompts"], stats[f"{split}/truncated_responses"]
    lost = "end" if dataset_cfg.truncation_mode == KEEP_START else "start"
    other_mode = KEEP_END if dataset_cfg.truncation_mode == KEEP_START else KEEP_START
    response_limits = [f"dataset.max_length={dataset_cfg.max_length}"]
    if dataset_cfg.max_completion_length is not None:
        response_limits.append(
            f"{stats[f'{split}/truncated_by_completion_length']} by dataset.max_completion_length="
            f"{dataset_cfg.max_completion_length}"
        )
    return (
        f"{stats[f'{split}/truncated_share']:.0%} of {split} pairs ({stats[f'{split}/truncated']}/"
        f"{stats[f'{split}/pairs']}) were truncated: {prompts} lost the {lost} of their prompt (dataset.max_length="
        f"{dataset_cfg.max_length} kept dataset.max_prompt_length={dataset_cfg.max_prompt_length} prompt tokens, "
        f"dataset.truncation_mode={dataset_cfg.truncation_mode}), {responses} the end of a response and its "
        f"end-of-turn token ({', '.join(response_limits)}); raise those limits"
        + (f" or set dataset.truncation_mode={other_mode}" if prompts else "")
        + ", or set dataset.warn_truncated_share=1 to accept it"
    )
