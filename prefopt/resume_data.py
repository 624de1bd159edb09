"""Parent side of the data check on resume: before any worker starts (and before anything is written to the
run dir), build the data exactly as the worker will and refuse a resume on other data than the checkpoint
trained on (prefopt/data/identity.py). Costs a tokenizer load and a tokenization (cached: the worker then
reads the cache), never a model load. The worker checks again (sbatch runs and requeues do not pass here).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from prefopt.checkpoint import load_trainer_state
from prefopt.data import build_preference_data
from prefopt.data.identity import ALLOW_CHANGED, check_resume_data, data_identity
from prefopt.errors import CheckpointError
from prefopt.models import load_tokenizer


def refuse_changed_data(cfg: DictConfig, checkpoint: Path) -> None:
    """DataError when `checkpoint` (the one resume.check_resume accepted) recorded other data than cfg.dataset
    gives now. Its checksums are verified by the worker; an unreadable state file is the worker's to name."""
    if cfg.trainer.resume_data_changed == ALLOW_CHANGED:
        return  # the worker compares, warns and records the change
    try:
        saved = load_trainer_state(checkpoint).get("data")
    except (CheckpointError, OSError):
        return
    if not saved:
        return  # a checkpoint from before prefopt recorded its data
    data = build_preference_data(cfg.dataset, load_tokenizer(cfg.model), cfg.trainer.seed)
    check_resume_data(saved, data_identity(data), checkpoint, cfg.trainer.resume_data_changed)
