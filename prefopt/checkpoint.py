"""Checkpoints: written whole or not at all, verified before use, never someone else's.

Layout: run_dir/checkpoints/step-000010/{policy/ (HF format), engine_state.pt or deepspeed/,
trainer_state.pt, config.yaml, manifest.json} and run_dir/checkpoints/latest naming the newest. A
checkpoint is built in a hidden staging dir and renamed into place, so a kill mid-save leaves the
previous one intact. Its manifest lists every file with size and SHA-256 (written last, so a
checkpoint without one is incomplete); resume verifies it and falls back to the newest valid
checkpoint, naming each bad one. Each checkpoint also keeps the config it was trained with: resume
refuses a checkpoint whose config differs (except the keys that only say how to resume).

Loading is safe: prefopt's own state files are read with `torch.load(weights_only=True)` (tensors and
plain containers only; a pickled object is refused). DeepSpeed's own checkpoint loader unpickles, so
a DeepSpeed checkpoint is only loaded when every file in it belongs to the current user and is not
writable by others (a run dir you own); see `check_trusted`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from prefopt.errors import CheckpointError
from prefopt.distributed import DistInfo
from prefopt.fileutil import atomic_write_json, atomic_write_text, file_digest

log = logging.getLogger("prefopt")

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
CHECKPOINT_CONFIG = "config.yaml"
# keys that say how to run or resume, not what is trained: they may differ between a checkpoint and its resume
RESUME_KEYS = ("run_dir", "trainer.resume", "trainer.stop_after", "trainer.save_every", "trainer.save_total_limit",
               "trainer.save_on_interrupt", "trainer.max_skipped_steps", "logger", "sweep", "hardware.num_threads",
               "trainer.resume_data_changed",  # it says whether a resume may continue on changed data, nothing trained
               "eval", "hardware.chosen_by")  # eval: `prefopt eval` settings, nothing trained; chosen_by: hardware=auto's note (this machine's RAM)


def training_config(cfg: DictConfig | dict) -> dict:
    """The config without RESUME_KEYS: what must match for a checkpoint to belong to a run. Under
    trainer.num_epochs, trainer.max_steps is left out too: the worker derives it from the data (and
    records it), so a command line's null and a run dir's derived count are the same run."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))
    trainer = container.get("trainer")
    if isinstance(trainer, dict) and trainer.get("num_epochs") is not None:
        trainer.pop("max_steps", None)
    for key in RESUME_KEYS:
        *parents, leaf = key.split(".")
        node = container
        for parent in parents:
            node = node.get(parent, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return container


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def write_manifest(directory: Path) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(path.relative_to(directory))] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    atomic_write_json(directory / MANIFEST, {"version": 1, "files": files})


def manifest_problem(directory: Path) -> Optional[str]:
    """None when every file the manifest lists is there with its size and checksum, else what is wrong."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (incomplete, or written by an older prefopt)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable manifest.json ({error})"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['size']} (truncated?)"
        if file_digest(path) != expected["sha256"]:
            return f"{name} does not match its checksum (corrupted or replaced)"
    return None


def save_checkpoint(run_dir: Path, step: int, engine, tokenizer, trainer_state: dict[str, Any], dist: DistInfo,
                    cfg: DictConfig, keep: Optional[int] = 2, protect: Optional[Path] = None) -> Path:
    """Every rank writes its part into one staging dir (ZeRO shards); rank 0 renames it into place, then
    prunes to `keep` checkpoints (trainer.save_total_limit; None = keep all), never `protect`."""
    root = run_dir / CHECKPOINTS
    target = root / f"step-{step:06d}"
    staging = root / f".{target.name}.partial"  # the same path on every rank
    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed mid-save
        staging.mkdir(parents=True)
    dist.barrier()
    try:
        engine.save(staging, tokenizer)
        dist.barrier()
        if dist.is_main:
            torch.save(trainer_state, staging / TRAINER_STATE)
    except RuntimeError as error:  # torch.save reports a full disk as a RuntimeError: make it the OSError it is
        raise unwritable(staging, error) from None
    if dist.is_main:
        atomic_write_text(staging / CHECKPOINT_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        write_manifest(staging)  # last: a checkpoint with a valid manifest is complete
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        atomic_write_text(root / "latest", target.name + "\n")
        log.info("saved checkpoint %s", target)
        for old in checkpoints_beyond_limit(root, keep, target, protect):
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed checkpoint %s (trainer.save_total_limit=%s)", old, keep)
    dist.barrier()
    return target


def checkpoints_beyond_limit(root: Path, keep: Optional[int], newest: Path, protect: Optional[Path] = None) -> list[Path]:
    """What pruning removes once `newest` is complete: the oldest checkpoints past `keep` (newest counts
    toward it; None = keep all), never `newest` itself nor `protect` (the checkpoint this run resumed from)."""
    if keep is None:
        return []
    spared = {newest.resolve()} | ({Path(protect).resolve()} if protect is not None else set())
    others = sorted((path for path in root.glob("step-*") if path.resolve() not in spared and not path.name.endswith(".partial")),
                    reverse=True)  # newest first (zero-padded step numbers)
    return others[max(0, keep - 1):]


def unwritable(path: Path, error: Exception) -> OSError:
    """The OSError a failed checkpoint write really was (ENOSPC when the disk is full), naming the path."""
    free = shutil.disk_usage(path if path.exists() else path.parent).free
    code = errno.ENOSPC if free < (64 << 20) else errno.EIO
    return OSError(code, f"{os.strerror(code)} ({str(error).splitlines()[0]})", str(path))


def config_differences(ours: DictConfig | dict, theirs: DictConfig | dict) -> list[tuple[str, Any, Any]]:
    """(key, their value, our value) for every training key that differs (RESUME_KEYS aside), by key."""
    ours_flat, theirs_flat = flatten(training_config(ours)), flatten(training_config(theirs))
    return [(key, theirs_flat.get(key), ours_flat.get(key)) for key in sorted(ours_flat.keys() | theirs_flat.keys())
            if ours_flat.get(key) != theirs_flat.get(key)]


def config_mismatch(directory: Path, cfg: DictConfig) -> Optional[str]:
    """None when the checkpoint was trained with this config (RESUME_KEYS aside), else the differing keys."""
    saved = OmegaConf.to_container(OmegaConf.load(directory / CHECKPOINT_CONFIG), resolve=True)
    differing = config_differences(cfg, saved)
    if not differing:
        return None
    shown = ", ".join(f"{key}: checkpoint {theirs!r} vs now {ours!r}" for key, theirs, ours in differing[:5])
    return f"it belongs to another config ({shown}{', ...' if len(differing) > 5 else ''})"


def checkpoint_candidates(path: Path) -> list[Path]:
    """A checkpoint dir itself, or a run dir's checkpoints, newest first."""
    if (path / MANIFEST).is_file() or (path / TRAINER_STATE).is_file():
        return [path]
    return sorted((p for p in (path / CHECKPOINTS).glob("step-*") if not p.name.endswith(".partial")), reverse=True)


def find_checkpoint(resume: Any, run_dir: Path, cfg: Optional[DictConfig] = None, key: str = "trainer.resume",
                    missing_ok: bool = False) -> Optional[Path]:
    """resume: false -> None; true or latest (the parent has already moved the run into the run dir it
    chose) -> this run dir's newest valid checkpoint; a path -> that checkpoint or run dir's newest valid
    one. Invalid ones are skipped with a warning naming them; when checkpoints exist and none is valid,
    or none exists, it is an error, except with missing_ok (a SLURM requeue before the first save)."""
    from prefopt.resume import resume_mode

    mode = resume_mode(resume)
    if mode == "off":
        return None
    explicit = mode == "path"
    path = Path(os.path.expanduser(str(resume))) if explicit else run_dir
    candidates = checkpoint_candidates(path)
    problems = []
    for candidate in candidates:
        problem = manifest_problem(candidate)
        if problem is None and cfg is not None:
            problem = config_mismatch(candidate, cfg)
        if problem is None:
            if problems:
                log.warning("resuming from %s instead (newer checkpoints skipped: %s)", candidate, "; ".join(problems))
            return candidate
        problems.append(f"{candidate}: {problem}")
        log.warning("checkpoint %s is not usable: %s", candidate, problem)
    if problems:
        raise CheckpointError(f"{key}={resume}: no valid checkpoint. " + "; ".join(problems)
                              + ". Start a fresh run in a new dir, or point trainer.resume at a valid checkpoint")
    if explicit or not missing_ok:
        raise CheckpointError(f"{key}={resume}: no checkpoint found there (looked for {path / CHECKPOINTS}/step-*)")
    log.warning("requeued, but %s has no checkpoint yet: starting from step 0", run_dir)
    return None


def safe_load(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers: a file that would run code is refused."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain prefopt state file ({type(error).__name__}: {str(error).splitlines()[0]}). "
            f"It may have been written by someone else; resume only from run dirs you trust"
        ) from None


def check_trusted(directory: Path) -> None:
    """DeepSpeed's loader unpickles: only load files owned by this user and not writable by others."""
    uid = os.getuid()
    for path in [directory, *directory.rglob("*")]:
        info = path.lstat()
        if info.st_uid != uid or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or stat.S_ISLNK(info.st_mode):
            raise CheckpointError(
                f"refusing to load the DeepSpeed checkpoint {directory}: {path} is owned by uid {info.st_uid} or writable "
                f"by others (DeepSpeed loads it with pickle, which can run code). Resume only from run dirs you own"
            )


def load_trainer_state(directory: Path) -> dict[str, Any]:
    return safe_load(directory / TRAINER_STATE)
