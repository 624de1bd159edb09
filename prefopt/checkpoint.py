"""Checkpoints: written whole or not at all, found again for resume.

Layout: run_dir/checkpoints/step-000010/{policy/ (HF format), engine_state.pt, trainer_state.pt}
and run_dir/checkpoints/latest naming the newest complete one. A checkpoint is built in a hidden
staging dir and renamed into place, so a kill mid-save leaves the previous one intact.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from prefopt.config import ConfigError
from prefopt.distributed import DistInfo
from prefopt.fileutil import atomic_write_text

log = logging.getLogger("prefopt")

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"


def save_checkpoint(run_dir: Path, step: int, engine, tokenizer, trainer_state: dict[str, Any], dist: DistInfo, keep: int = 2) -> Path:
    """Every rank writes its part into one staging dir (ZeRO shards); rank 0 renames it into place."""
    root = run_dir / CHECKPOINTS
    target = root / f"step-{step:06d}"
    staging = root / f".{target.name}.partial"  # the same path on every rank
    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed mid-save
        staging.mkdir(parents=True)
    dist.barrier()
    engine.save(staging, tokenizer)
    dist.barrier()
    if dist.is_main:
        torch.save(trainer_state, staging / TRAINER_STATE)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        atomic_write_text(root / "latest", target.name + "\n")
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", target)
    dist.barrier()
    return target


def is_complete(directory: Path) -> bool:
    policy = directory / "policy"
    return (directory / TRAINER_STATE).is_file() and ((policy / "config.json").is_file() or (policy / "adapter_config.json").is_file())


def find_checkpoint(resume: Any, run_dir: Path, key: str = "trainer.resume") -> Optional[Path]:
    """resume: false -> None; true -> this run dir's latest; a path -> that checkpoint or run dir's latest."""
    if resume is False or resume in ("false", "False", ""):
        return None
    explicit = resume is not True and resume not in ("true", "True")
    path = Path(os.path.expanduser(str(resume))) if explicit else run_dir
    if is_complete(path):
        return path
    root = path / CHECKPOINTS
    latest = root / "latest"
    candidates = [root / latest.read_text().strip()] if latest.exists() else []
    candidates += sorted((p for p in root.glob("step-*") if not p.name.endswith(".partial")), reverse=True)
    for candidate in candidates:
        if is_complete(candidate):
            return candidate
    if explicit:
        raise ConfigError(f"{key}={resume}: no complete checkpoint found there (looked for {root}/step-*)")
    log.warning("trainer.resume=true but %s has no checkpoint yet: starting from step 0", run_dir)
    return None


def load_trainer_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / TRAINER_STATE, weights_only=False)
