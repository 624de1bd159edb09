"""Which run `trainer.resume` continues, decided in the parent before anything is written.

    trainer.resume=true      this run dir's newest checkpoint; a dir without one is an error that lists
                             the newest runs that have checkpoints (step, age, same config or not) as
                             ready-to-paste `trainer.resume=PATH` overrides
    trainer.resume=latest    the newest run with a checkpoint and this same config (RESUME_KEYS aside,
                             compared with the resolved config.yaml each run dir keeps), continued in
                             its own dir; none: an error naming what differs in the nearest runs
    trainer.resume=PATH      that run dir or checkpoint (launch.resume_run_dir)

The checkpoint a resume continues is checked against this config by `check_resume` before the parent
writes anything into the run dir: a refusal names each differing key with both values and leaves the
run's record (config.yaml, overrides.yaml, .hydra/, no error.txt) as it was.

Runs are searched under the roots the config points at: the fixed part of `hydra.run.dir` and of
`hydra.sweep.dir` (outputs/ and multirun/ by default; a dir given without a timestamp: its parent), a
few levels deep. A finished run (summary.json) is never picked by `latest`: there is nothing to continue.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from prefopt.core.errors import CheckpointError
from prefopt.core.rundir import existing_run
from prefopt.core.runfiles import (
    CHECKPOINTS,
    CONFIG_FILE,
    MANIFEST,
    POLICY_DIR,
    SUMMARY_FILE,
    WANDB_DIR,
    checkpoint_step,
)
from prefopt.data import PreferenceData, build_preference_data
from prefopt.data.arith import OnPolicySamplesNeeded
from prefopt.data.identity import ALLOW_CHANGED, check_resume_data, data_identity
from prefopt.model.loading import load_tokenizer
from prefopt.train.checkpoint import (
    RESUME_KEYS,
    checkpoint_candidates,
    config_differences,
    length_change,
    load_trainer_state,
    resume_differences,
    resume_mode,
)
from prefopt.train.onpolicy import cached_onpolicy_samples
from prefopt.train.schedules import epoch_steps

log = logging.getLogger("prefopt")

MAX_DEPTH = 4  # levels below a root searched for run dirs (multirun/DATE/TIME/JOB is 3)
MAX_DIRS_VISITED = 20_000  # bounds the search in a huge tree (a root that is someone's home)
MAX_LISTED = 5  # runs listed in an error
SKIPPED_DIRS = (CHECKPOINTS, WANDB_DIR, POLICY_DIR, "__pycache__", "node_modules")  # never hold run dirs


@dataclass(frozen=True)
class RunCheckpoint:
    run_dir: Path
    checkpoint: Path  # its newest complete checkpoint (manifest written; verified only when resumed)
    step: int
    saved_at: float  # the manifest's modification time

    def override(self) -> str:
        return shlex.quote(f"trainer.resume={self.run_dir}")

    def describe(self) -> str:
        return f"step {self.step}, saved {time.strftime('%Y-%m-%d %H:%M', time.localtime(self.saved_at))}"


def search_root(resolved: Path, template: str, cwd: Path) -> Path:
    """The dir holding this kind of run dir: `resolved` (a dir template, resolved) less its trailing
    interpolated parts (outputs/${now:%Y-%m-%d}/${now:%H-%M-%S-%f} -> outputs), or its parent when the
    template has none (a run given its own dir: its siblings)."""
    trailing = 0
    for part in reversed(Path(template).parts):
        if "${" not in part:
            break
        trailing += 1
    root = Path(resolved)
    for _ in range(max(1, min(trailing, len(root.parts) - 1))):
        root = root.parent
    return root if root.is_absolute() else cwd / root


def search_roots(fallback_run_dir: Path) -> list[Path]:
    """The outputs root and the multirun root of this Hydra app's config; outside Hydra, the run dir's parent."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return [Path(fallback_run_dir).resolve().parent]
    hydra = HydraConfig.get()
    cwd = Path(hydra.runtime.cwd)
    roots: list[Path] = []
    for node in (hydra.run, hydra.sweep):
        template = str(OmegaConf.to_container(node, resolve=False)["dir"])
        root = search_root(Path(str(node.dir)), template, cwd).resolve()
        if root not in roots:
            roots.append(root)
    return roots


def _run_dirs(root: Path) -> Iterator[Path]:
    """Dirs with a checkpoints/ dir under root (root included), at most MAX_DEPTH levels down."""
    stack, visited = [(root, 0)], 0
    while stack and visited < MAX_DIRS_VISITED:
        directory, depth = stack.pop()
        visited += 1
        if (directory / CHECKPOINTS).is_dir():
            yield directory
            continue
        if depth >= MAX_DEPTH:
            continue
        try:
            entries = [entry for entry in os.scandir(directory) if entry.is_dir(follow_symlinks=False)]
        except OSError:  # unreadable: someone else's dir
            continue
        stack += [
            (Path(entry.path), depth + 1)
            for entry in entries
            if not entry.name.startswith(".") and entry.name not in SKIPPED_DIRS
        ]


def newest_checkpoint(run_dir: Path) -> Optional[RunCheckpoint]:
    for candidate in checkpoint_candidates(run_dir):
        manifest = candidate / MANIFEST
        if manifest.is_file():
            return RunCheckpoint(run_dir, candidate, checkpoint_step(candidate), manifest.stat().st_mtime)
    return None


def runs_with_checkpoints(roots: list[Path], exclude: Optional[Path] = None) -> list[RunCheckpoint]:
    """Every run dir under the roots with a complete checkpoint, newest checkpoint first."""
    excluded = Path(exclude).resolve() if exclude is not None else None
    found: dict[Path, RunCheckpoint] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for run_dir in _run_dirs(root):
            run_dir = run_dir.resolve()
            if run_dir != excluded and run_dir not in found:
                run = newest_checkpoint(run_dir)
                if run is not None:
                    found[run_dir] = run
    return sorted(found.values(), key=lambda run: run.saved_at, reverse=True)


def saved_config(run_dir: Path) -> Optional[dict]:
    """The resolved config a run dir recorded (config.yaml), or None when it has none or it is unreadable."""
    try:
        return OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE), resolve=True)
    except Exception:  # missing, or not YAML: such a run cannot match
        return None


def describe_differences(differences: list[tuple[str, Any, Any]], limit: Optional[int] = 3) -> str:
    """The differing keys with both values (limit: how many; None = all)."""
    limit = len(differences) if limit is None else limit
    shown = ", ".join(f"{key}: {theirs!r} there vs {ours!r} now" for key, theirs, ours in differences[:limit])
    return shown + (f", and {len(differences) - limit} more" if len(differences) > limit else "")


def roots_text(roots: list[Path]) -> str:
    return " and ".join(str(root) for root in roots)


def no_checkpoint_error(run_dir: Path, roots: list[Path], cfg: DictConfig) -> CheckpointError:
    """trainer.resume=true in a dir without a checkpoint: what the user can resume instead."""

    why = (
        "the run there stopped before its first checkpoint; trainer.save_every=N saves every N steps"
        if existing_run(run_dir)
        else "a new dir: Hydra gives each launch a new timestamped one"
    )
    lines = [f"trainer.resume=true, but run dir {run_dir} has no checkpoint to continue ({why})."]
    runs = runs_with_checkpoints(roots, exclude=run_dir)[:MAX_LISTED]
    if not runs:
        lines.append(
            f"No run under {roots_text(roots)} has a checkpoint either: leave trainer.resume out to start a fresh run."
        )
        return CheckpointError("\n".join(lines))
    lines.append(f"The newest runs with checkpoints under {roots_text(roots)} (paste one):")
    for run in runs:
        saved = saved_config(run.run_dir)
        differences = config_differences(cfg, saved) if saved is not None else None
        match = (
            "unreadable config.yaml"
            if differences is None
            else "same config"
            if not differences
            else f"other config: {describe_differences(differences, limit=2)}"
        )
        lines.append(f"  {run.override()}    ({run.describe()}; {match})")
    lines.append(
        "Or trainer.resume=latest continues the newest run with this config; leave trainer.resume out to start fresh."
    )
    return CheckpointError("\n".join(lines))


def find_latest_run(cfg: DictConfig, roots: list[Path], exclude: Optional[Path] = None) -> RunCheckpoint:
    """trainer.resume=latest: the newest unfinished run under the roots with a checkpoint and this config."""

    runs = runs_with_checkpoints(roots, exclude)
    nearest: list[tuple[int, RunCheckpoint, list]] = []
    finished: list[RunCheckpoint] = []
    for run in runs:
        saved = saved_config(run.run_dir)
        if saved is None:
            continue
        differences = config_differences(cfg, saved)
        if differences:
            nearest.append((len(differences), run, differences))
        elif (run.run_dir / SUMMARY_FILE).exists():
            finished.append(run)
        else:
            log.info("trainer.resume=latest: continuing %s (%s)", run.run_dir, run.describe())
            return run
    if finished:
        raise CheckpointError(
            f"trainer.resume=latest: the runs with this config under {roots_text(roots)} have finished "
            f"(newest: {finished[0].run_dir}, {finished[0].describe()}, summary.json written); there is "
            f"nothing to continue. Leave trainer.resume out to start a fresh run"
        )
    if not nearest:
        raise CheckpointError(
            f"trainer.resume=latest: no run under {roots_text(roots)} has a checkpoint; leave trainer.resume "
            f"out to start a fresh run (trainer.save_every=N checkpoints every N steps)"
        )
    nearest.sort(key=lambda item: (item[0], -item[1].saved_at))
    listed = "; ".join(
        f"{run.run_dir} ({run.describe()}): {describe_differences(differences)}" for _, run, differences in nearest[:3]
    )
    raise CheckpointError(
        f"trainer.resume=latest: no run under {roots_text(roots)} with a checkpoint has this config. "
        f"Nearest: {listed}. Use the same values to continue one of them (or trainer.resume=PATH with its own "
        f"config), or leave trainer.resume out to start fresh"
    )


@dataclass(frozen=True)
class AcceptedResume:
    checkpoint: Path
    step: int
    length_change: Optional[str]  # the warning line when the resume changes trainer.max_steps / num_epochs


def yaml_value(value: Any) -> str:
    """A value as a command-line override writes it."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def accept_resume(cfg: DictConfig, run_dir: Path) -> Optional[AcceptedResume]:
    """The parent's whole resume check, before anything is written: check_resume, with the steps trainer.num_epochs
    gives on this data, then the data's identity (refuse_changed_data). The data is built at most once, and only when
    a checkpoint is there to check against; never a model."""
    data: Optional[PreferenceData] = None
    derived = None
    if cfg.trainer.num_epochs is not None and checkpoint_candidates(resume_path(cfg, run_dir)):
        data = resume_data(cfg)
    if data is not None:
        derived = epoch_steps(
            cfg.trainer.num_epochs,
            len(data.train),
            cfg.trainer.micro_batch_size,
            cfg.trainer.grad_accum,
            cfg.hardware.gpus_per_node * cfg.hardware.nodes,
        )  # the world size the worker will have
    accepted = check_resume(cfg, run_dir, derived)
    if accepted is not None:
        refuse_changed_data(cfg, accepted.checkpoint, data)
    return accepted


def resume_data(cfg: DictConfig) -> Optional[PreferenceData]:
    """The data exactly as the worker will build it (a tokenizer load and a tokenization, cached: the worker then
    reads the cache). Its warnings are the worker's to say, once. None where the pairs need the model (arith onpolicy
    samples not cached): the worker builds them and makes the same checks."""
    tokenizer = load_tokenizer(cfg.model)
    samples = cached_onpolicy_samples(cfg.model, cfg.dataset, cfg.trainer.seed, tokenizer)  # arith onpolicy
    try:
        return build_preference_data(cfg.dataset, tokenizer, cfg.trainer.seed, announce=False, samples=samples)
    except OnPolicySamplesNeeded:
        return None


def refuse_changed_data(cfg: DictConfig, checkpoint: Path, data: Optional[PreferenceData] = None) -> None:
    """DataError when `checkpoint` (the one check_resume accepted) recorded other data than cfg.dataset gives now
    (prefopt/data/identity.py). data: already built, else built here when there is something to compare. Its
    checksums are verified by the worker; an unreadable state file is the worker's to name. The worker checks
    again (sbatch runs and requeues do not pass here)."""
    if cfg.trainer.resume_data_changed == ALLOW_CHANGED:
        return  # the worker compares, warns and records the change
    try:
        saved = load_trainer_state(checkpoint).get("data")
    except (CheckpointError, OSError):
        return
    if not saved:
        return  # a checkpoint from before prefopt recorded its data
    current = data if data is not None else resume_data(cfg)
    if current is None:
        return  # the pairs need the model: the worker compares
    check_resume_data(saved, data_identity(current), checkpoint, cfg.trainer.resume_data_changed)


def resume_path(cfg: DictConfig, run_dir: Path) -> Path:
    """Where trainer.resume looks for checkpoints: the path it names, else the run dir."""
    resume = cfg.trainer.resume
    return Path(str(resume)).expanduser() if resume_mode(resume) == "path" else run_dir


def check_resume(cfg: DictConfig, run_dir: Path, derived_steps: Optional[int] = None) -> Optional[AcceptedResume]:
    """The checkpoint trainer.resume continues, if this config may continue it; else a CheckpointError naming every
    key that differs (both values) and how to fix it. None when there is none to check (a SLURM requeue before its
    first save). Reads only: nothing in the run dir changes either way. The checksums are verified by the worker,
    which falls back to an older checkpoint past a damaged one, as this does past one of another config.

    A resume may change RESUME_KEYS (logging, cadences, save limits), and the run's length: a larger
    trainer.max_steps (or num_epochs) extends a run, finished or not, as a Hugging Face Trainer resumed with a
    larger max_steps does: the schedule is rebuilt for the new length and its step count continues from the
    checkpoint's (the next step's LR is the one the old schedule set; each after it, the new schedule's)."""
    resume = cfg.trainer.resume
    candidates = checkpoint_candidates(resume_path(cfg, run_dir))
    refusals: list[tuple[Path, list[tuple[str, Any, Any]]]] = []
    unusable = []
    for candidate in candidates:
        saved = saved_config(candidate) if (candidate / MANIFEST).is_file() else None
        if saved is None:
            unusable.append(
                f"{candidate}: "
                + ("unreadable config.yaml" if (candidate / MANIFEST).is_file() else "no manifest.json (incomplete)")
            )
            continue
        step = checkpoint_step(candidate)
        differences = resume_differences(cfg, saved, step, derived_steps)
        if differences:
            refusals.append((candidate, differences))
            continue
        change = length_change(cfg, saved)
        note = None
        if change is not None:
            key, theirs, ours = change
            note = (
                f"{key}: {theirs} -> {ours}: continuing {candidate.name} with the new length; the LR schedule is "
                f"rebuilt for it and its step count continues from step {step}, as a Hugging Face Trainer resumed "
                "with a larger max_steps does (the next step keeps the LR already set, the following ones follow the "
                "new schedule)"
            )
        return AcceptedResume(candidate, step, note)
    if refusals:
        raise refusal_error(resume, run_dir, *refusals[0])
    if unusable:
        raise CheckpointError(
            f"trainer.resume={yaml_value(resume)}: no valid checkpoint. {'; '.join(unusable)}. Start a fresh run in a "
            f"new dir, or point trainer.resume at a valid checkpoint; nothing in {run_dir} was changed"
        )
    return None


def refusal_error(
    resume: Any, run_dir: Path, checkpoint: Path, differences: list[tuple[str, Any, Any]]
) -> CheckpointError:
    shown = describe_differences(differences, limit=None)
    fix = " ".join(f"{key}={yaml_value(theirs)}" for key, theirs, _ in differences)
    may_change = ", ".join(
        key if "." in key else f"{key}.*"
        for key in RESUME_KEYS
        if key not in ("run_dir", "trainer.resume", "hardware.chosen_by")
    )
    return CheckpointError(
        f"trainer.resume={yaml_value(resume)}: checkpoint {checkpoint} belongs to another config ({shown}). Resume "
        f"with its values ({fix}), or start a fresh run in a new dir; a resume may change only {may_change}, and "
        "trainer.max_steps or trainer.num_epochs (not to fewer steps than the checkpoint's "
        f"{checkpoint_step(checkpoint)}). Nothing in {run_dir} was changed"
    )
