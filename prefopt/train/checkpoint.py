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
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from prefopt.core.distributed import DistInfo
from prefopt.core.errors import CheckpointError
from prefopt.core.fileutil import atomic_write_json, atomic_write_text, file_digest
from prefopt.core.runfiles import (
    CHECKPOINT_GLOB,
    CHECKPOINTS,
    CONFIG_FILE,
    LATEST_FILE,
    MANIFEST,
    TRAINER_STATE,
    checkpoint_dir_name,
    checkpoint_dirs,
    checkpoint_step,
    retired_copies,
    retired_dir,
    retired_target,
    staging_dir,
)

log = logging.getLogger("prefopt")

# keys that say how to run, log or resume, not what is trained: they may differ between a checkpoint and its resume.
# Cadences only (which rows metrics.jsonl gets, when a checkpoint is written): what an eval or probe measures
# (batches, probes, generation length) stays fixed, so a run's first and last evals compare like with like
RESUME_KEYS = (
    "run_dir",
    "trainer.resume",
    "trainer.stop_after",
    "trainer.save_every",
    "trainer.save_total_limit",
    "trainer.save_on_interrupt",
    "trainer.save_final",
    "trainer.max_skipped_steps",
    "trainer.log_every",
    "trainer.eval_every",
    "dynamics.every_n_steps",
    "dynamics.token_views",  # per-token logging of the probes: what is written, not what is measured or trained
    "dynamics.token_view_probes",
    "dynamics.top_gainers",
    "logger",
    "sweep",
    "hardware.num_threads",
    "trainer.resume_data_changed",  # whether a resume may continue on changed data: nothing trained
    "dataset.warn_truncated_share",  # when a truncation warning is said: the pairs are the same
    "eval",
    "hardware.chosen_by",
)  # eval: `prefopt eval` settings, nothing trained; chosen_by: hardware=auto's note (this machine's RAM)
# how long the run trains: a resume may change it (extend a run; HF Trainer's semantics, see resume.check_resume), as
# long as the checkpoint's step is not past the new end; trainer.resume=latest still asks for the same length
LENGTH_KEYS = ("trainer.max_steps", "trainer.num_epochs")


def training_config(cfg: DictConfig | dict, length: bool = True) -> dict:
    """The config without RESUME_KEYS (and LENGTH_KEYS unless `length`): what must match for a checkpoint to
    belong to a run. Under trainer.num_epochs, trainer.max_steps is left out too: the worker derives it from the
    data (and records it), so a command line's null and a run dir's derived count are the same run."""
    container = (
        OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))
    )
    trainer = container.get("trainer")
    if isinstance(trainer, dict) and trainer.get("num_epochs") is not None:
        trainer.pop("max_steps", None)
    for key in RESUME_KEYS + (() if length else LENGTH_KEYS):
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


def save_checkpoint(
    run_dir: Path,
    step: int,
    engine,
    tokenizer,
    trainer_state: dict[str, Any],
    dist: DistInfo,
    cfg: DictConfig,
    keep: Optional[int] = 2,
    protect: Optional[Path] = None,
    write_extra: Optional[Callable[[Path], None]] = None,
) -> Path:
    """Every rank writes its part into one staging dir (ZeRO shards); rank 0 renames it into place, then
    prunes to `keep` checkpoints (trainer.save_total_limit; None = keep all), never `protect`. write_extra(staging):
    rank 0's other state files (a moving reference's weights), written before the manifest."""
    root = run_dir / CHECKPOINTS
    target = root / checkpoint_dir_name(step)
    staging = staging_dir(target)  # the same path on every rank
    if dist.is_main:
        restore_retired(root)  # a kill between the two renames below: the complete old one goes back in place
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed mid-save
        staging.mkdir(parents=True)
    dist.barrier()
    try:
        engine.save(staging, tokenizer)
        dist.barrier()
        if dist.is_main:
            torch.save(trainer_state, staging / TRAINER_STATE)
            if write_extra is not None:
                write_extra(staging)
            atomic_write_text(staging / CONFIG_FILE, frozen_yaml(cfg))
            write_manifest(staging)  # last: a checkpoint with a valid manifest is complete
    except (
        Exception
    ) as error:  # a full disk: torch.save says RuntimeError, safetensors SafetensorError; say what it was
        full = disk_full(error, staging)  # before the staging dir's space is freed
        if dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # the space it took, and nothing half-written left behind
        if not full:
            raise
        raise OSError(
            errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({str(error).splitlines()[0]})", str(staging)
        ) from None
    if dist.is_main:
        replace_checkpoint(staging, target)
        atomic_write_text(root / LATEST_FILE, target.name + "\n")
        log.info("saved checkpoint %s", target)
        for old in checkpoints_beyond_limit(root, keep, target, protect):
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed checkpoint %s (trainer.save_total_limit=%s)", old, keep)
    dist.barrier()
    return target


def replace_checkpoint(staging: Path, target: Path) -> None:
    """Move a complete staging dir into place. A checkpoint of the same step (a finished run resumed saves its last
    step again) is first renamed aside, and deleted only once the new one is in place: a kill at any instant leaves
    a complete step-N, or its retired copy, which restore_retired (the next save, the next resume) puts back."""
    retired = retired_dir(target)
    if target.exists():
        shutil.rmtree(retired, ignore_errors=True)  # a stale copy: target itself is complete
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def restore_retired(root: Path) -> list[Path]:
    """Put back a checkpoint renamed aside by a save killed before its replacement was in place; drop those
    whose replacement made it (a kill before the delete)."""
    restored = []
    for retired in retired_copies(root):
        target = retired_target(retired)
        if target.exists():
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(retired, target)
            log.warning("restored checkpoint %s (a save of the same step was cut off before it was complete)", target)
            restored.append(target)
    return restored


FULL_MARKS = ("No space left", "os error 28", "StorageFull", "Disk quota", "os error 122")  # ENOSPC / EDQUOT in words
# what torch (PytorchStreamWriter) and safetensors (IoError) say when a write failed, without saying why
WRITE_FAILED_MARKS = ("file write failed", "PytorchStreamWriter failed", "IoError", "unexpected pos")


def disk_full(error: BaseException, path: Path) -> bool:
    """Whether a failed write without an errno of its own (torch's RuntimeError, safetensors' SafetensorError) was a
    full disk or quota: its text says so, or it says a write failed and the disk has (almost) no space left. Any other
    error (CUDA out of memory, NCCL, a bug) is not, whatever the free space: it is re-raised as it was. An OSError with
    an errno already says what it is."""
    if isinstance(error, OSError) and error.errno is not None:
        return False
    text = str(error)
    if any(mark in text for mark in FULL_MARKS):
        return True
    if not (isinstance(error, OSError) or any(mark in text for mark in WRITE_FAILED_MARKS)):
        return False
    try:
        return shutil.disk_usage(path if path.exists() else path.parent).free < (64 << 20)
    except OSError:  # cannot tell: the original error, untouched, says more than a guess
        return False


def frozen_yaml(cfg: DictConfig | dict) -> str:
    """The config resolved once, as YAML that stays literal when loaded again: a string holding `${` (a value the
    user escaped, `\\${oc.env:SECRET}`) is escaped again, so the worker reading it never resolves it a second time."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return OmegaConf.to_yaml(OmegaConf.create(escape_interpolations(container)))


def escape_interpolations(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: escape_interpolations(item) for key, item in value.items()}
    if isinstance(value, list):
        return [escape_interpolations(item) for item in value]
    if isinstance(value, str) and "${" in value:
        # n backslashes before a literal `${`: 2n (each escaped) and one more that escapes the `${`
        return re.sub(r"(\\*)\$\{", lambda match: match.group(1) * 2 + "\\${", value)
    return value


def checkpoints_beyond_limit(
    root: Path, keep: Optional[int], newest: Path, protect: Optional[Path] = None
) -> list[Path]:
    """What pruning removes once `newest` is complete: the oldest checkpoints past `keep` (newest counts
    toward it; None = keep all), never `newest` itself nor `protect` (the checkpoint this run resumed from)."""
    if keep is None:
        return []
    spared = {newest.resolve()} | ({Path(protect).resolve()} if protect is not None else set())
    others = [path for path in checkpoint_dirs(root) if path.resolve() not in spared]  # newest first
    return others[max(0, keep - 1) :]


def config_differences(
    ours: DictConfig | dict, theirs: DictConfig | dict, length: bool = True
) -> list[tuple[str, Any, Any]]:
    """(key, their value, our value) for every training key that differs (RESUME_KEYS aside; LENGTH_KEYS too
    unless `length`), by key."""
    ours_flat, theirs_flat = flatten(training_config(ours, length)), flatten(training_config(theirs, length))
    return [
        (key, theirs_flat.get(key), ours_flat.get(key))
        for key in sorted(ours_flat.keys() | theirs_flat.keys())
        if ours_flat.get(key) != theirs_flat.get(key)
    ]


def resume_differences(
    cfg: DictConfig | dict, saved: DictConfig | dict, step: int, derived_steps: Optional[int] = None
) -> list[tuple[str, Any, Any]]:
    """What keeps a checkpoint at `step`, trained with `saved`, from continuing as `cfg`: the training keys that differ
    (RESUME_KEYS aside), and a length it cannot take (length_differences). epoch_steps: the steps cfg's
    trainer.num_epochs gives on this data, when known (derived_steps)."""
    return config_differences(cfg, saved, length=False) + length_differences(cfg, saved, step, derived_steps)


def config_mismatch(directory: Path, cfg: DictConfig) -> Optional[str]:
    """None when the checkpoint may continue as this config (the worker's cfg: under trainer.num_epochs its
    trainer.max_steps is already derived from the data), else the differing keys."""
    saved = OmegaConf.to_container(OmegaConf.load(directory / CONFIG_FILE), resolve=True)
    derived = cfg.trainer.max_steps if cfg.trainer.get("num_epochs") is not None else None
    differing = resume_differences(cfg, saved, checkpoint_step(directory), derived)
    if not differing:
        return None
    shown = ", ".join(f"{key}: checkpoint {theirs!r} vs now {ours!r}" for key, theirs, ours in differing[:5])
    return f"it belongs to another config ({shown}{', ...' if len(differing) > 5 else ''})"


def length_differences(
    ours: DictConfig | dict, theirs: DictConfig | dict, step: int, derived_steps: Optional[int] = None
) -> list[tuple[str, Any, Any]]:
    """The LENGTH_KEYS differences a resume cannot take: one run by steps and the other by epochs, or a length the
    checkpoint's step is already past: trainer.max_steps, or derived_steps, the steps ours' trainer.num_epochs gives
    (known only once the data is built). A longer or shorter run otherwise is an extension."""
    ours_t, theirs_t = (training_config(cfg).get("trainer", {}) for cfg in (ours, theirs))
    if (ours_t.get("num_epochs") is None) != (theirs_t.get("num_epochs") is None):
        return [(key, theirs_t.get(key.split(".")[1]), ours_t.get(key.split(".")[1])) for key in LENGTH_KEYS]
    if ours_t.get("num_epochs") is not None:
        past = derived_steps is not None and step > derived_steps
        return [("trainer.num_epochs", theirs_t.get("num_epochs"), ours_t.get("num_epochs"))] if past else []
    new_steps = ours_t.get("max_steps")
    if new_steps is not None and step > new_steps:
        return [("trainer.max_steps", theirs_t.get("max_steps"), new_steps)]
    return []


def length_change(ours: DictConfig | dict, theirs: DictConfig | dict) -> Optional[tuple[str, Any, Any]]:
    """(key, their value, our value) when a resume changes how long the run trains (one it may take), else None."""
    ours_t, theirs_t = (training_config(cfg).get("trainer", {}) for cfg in (ours, theirs))
    key = "num_epochs" if ours_t.get("num_epochs") is not None else "max_steps"
    return (f"trainer.{key}", theirs_t.get(key), ours_t.get(key)) if ours_t.get(key) != theirs_t.get(key) else None


LATEST = "latest"  # trainer.resume=latest: the newest run under the search roots


def resume_mode(resume: Any) -> str:
    """'off' | 'this' (true) | 'latest' | 'path', from trainer.resume as Hydra or YAML gave it."""
    if resume is False or resume in ("false", "False", "", None):
        return "off"
    if resume is True or resume in ("true", "True"):
        return "this"
    if resume == LATEST:
        return "latest"
    return "path"


def checkpoint_candidates(path: Path) -> list[Path]:
    """A checkpoint dir itself, or a run dir's checkpoints, newest first (runfiles.checkpoint_dirs). A retired copy
    (.step-N.retired) whose step-N is missing is that checkpoint (a save of step N was cut off mid-replace): listed,
    to be read where it is, so the parent can accept a resume before restore_retired moves anything."""
    if (path / MANIFEST).is_file() or (path / TRAINER_STATE).is_file():
        return [path]
    return checkpoint_dirs(path / CHECKPOINTS, retired=True)


def find_checkpoint(
    resume: Any, run_dir: Path, cfg: Optional[DictConfig] = None, key: str = "trainer.resume", missing_ok: bool = False
) -> Optional[Path]:
    """resume: false -> None; true or latest (the parent has already moved the run into the run dir it
    chose) -> this run dir's newest valid checkpoint; a path -> that checkpoint or run dir's newest valid
    one. Invalid ones are skipped with a warning naming them; when checkpoints exist and none is valid,
    or none exists, it is an error, except with missing_ok (a SLURM requeue before the first save)."""
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
        raise CheckpointError(
            f"{key}={resume}: no valid checkpoint. "
            + "; ".join(problems)
            + ". Start a fresh run in a new dir, or point trainer.resume at a valid checkpoint"
        )
    if explicit or not missing_ok:
        raise CheckpointError(
            f"{key}={resume}: no checkpoint found there (looked for {path / CHECKPOINTS}/{CHECKPOINT_GLOB})"
        )
    log.warning("requeued, but %s has no checkpoint yet: starting from step 0", run_dir)
    return None


def safe_load(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers: a file that would run code is refused."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain prefopt state file ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}). It may have been written by someone else; resume only from run dirs you "
            "trust"
        ) from None


def check_trusted(directory: Path) -> None:
    """DeepSpeed's loader unpickles: only load files owned by this user and not writable by others."""
    uid = os.getuid()
    for path in [directory, *directory.rglob("*")]:
        info = path.lstat()
        if info.st_uid != uid or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or stat.S_ISLNK(info.st_mode):
            raise CheckpointError(
                f"refusing to load the DeepSpeed checkpoint {directory}: {path} is owned by uid {info.st_uid} or "
                "writable by others (DeepSpeed loads it with pickle, which can run code). Resume only from run dirs "
                "you own"
            )


def load_trainer_state(directory: Path) -> dict[str, Any]:
    return safe_load(directory / TRAINER_STATE)
