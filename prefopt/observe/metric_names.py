"""Metric names across versions: prefopt took TRL's names (train/metrics.py), and run dirs written before that
still hold the old ones. Readers (`prefopt report`, the config check of trainer.objective; a reader of metrics.jsonl
rows should read each through with_current_names) see today's names."""

from __future__ import annotations

from typing import Any, Mapping, Optional

# names prefopt wrote before it took TRL's (run dirs from before the rename still hold them); `train/lr` became
# `train/learning_rate` in issue 24 (a run resumed across the rename has both, row by row)
RENAMED = {"rewards/accuracy": "rewards/accuracies", "rewards/margin": "rewards/margins", "lr": "learning_rate"}


def renamed_metric(key: str) -> Optional[str]:
    """The current name of a metric key written under a pre-TRL name (`eval/rewards/accuracy` ->
    `eval/rewards/accuracies`, `eval/delta/rewards/margin` -> ...), or None when `key` is not one."""
    for old, new in RENAMED.items():
        if key == old or key.endswith("/" + old):
            return key[: len(key) - len(old)] + new
    return None


def with_current_names(row: Mapping[str, Any]) -> dict[str, Any]:
    """A summary or metrics row of an old run dir, read with today's names: a key under a pre-TRL name
    is renamed, unless the row also has the new name (then the new one is kept)."""
    current: dict[str, Any] = {}
    for key, value in row.items():
        new = renamed_metric(key)
        if new is None:
            current[key] = value
        elif new not in row:
            current[new] = value
    return current
