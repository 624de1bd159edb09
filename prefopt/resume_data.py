"""Parent side of the data check on resume: before any worker starts (and before anything is written to the
run dir), build the data exactly as the worker will and refuse a resume on other data than the checkpoint
trained on (prefopt/data/identity.py). Costs a tokenizer load and a tokenization (cached: the worker then
reads the cache), never a model load. The worker checks again (sbatch runs and requeues do not pass here).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from prefopt.checkpoint import checkpoint_candidates, config_mismatch, load_trainer_state
from prefopt.data import build_preference_data
from prefopt.data.identity import ALLOW_CHANGED, check_resume_data, data_identity
from prefopt.models import load_tokenizer
from prefopt.resume import resume_mode


def refuse_changed_data(cfg: DictConfig, run_dir: Path) -> None:
    """DataError when the checkpoint this resume would load recorded other data than cfg.dataset gives now."""
    if cfg.trainer.resume_data_changed == ALLOW_CHANGED:
        return  # the worker compares, warns and records the change
    found = recorded_data(cfg, run_dir)
    if found is None or not found[1]:
        return  # no checkpoint to compare with (the worker says why), or one from before prefopt recorded its data
    checkpoint, saved = found
    data = build_preference_data(cfg.dataset, load_tokenizer(cfg.model), cfg.trainer.seed)
    check_resume_data(saved, data_identity(data), checkpoint, cfg.trainer.resume_data_changed)


def recorded_data(cfg: DictConfig, run_dir: Path) -> Optional[tuple[Path, Any]]:
    """(checkpoint, its data record) of the newest checkpoint of this config whose state file loads, or None.
    Cheap on purpose: the worker verifies the checkpoint's manifest (a checksum of every weight file) and names
    every problem; checking it here too would read the weights twice. All checkpoints of one run record the same
    data unless a resume allowed a change, so a fallback the worker makes compares the same way."""
    path = Path(os.path.expanduser(str(cfg.trainer.resume))) if resume_mode(cfg.trainer.resume) == "path" else run_dir
    for candidate in checkpoint_candidates(path):
        try:
            if config_mismatch(candidate, cfg) is not None:
                continue
            return candidate, load_trainer_state(candidate).get("data")
        except Exception:  # unreadable config or state file: the worker's checks name it
            continue
    return None
