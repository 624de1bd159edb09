"""Which jobs a Hydra multirun planned and how each stands (ok, failed, running, never ran): the rows of
`prefopt report` (prefopt/observe/report.py), read from the sweep dir alone. A folder that is no sweep dir (ad-hoc
runs, several sweeps) gives a row per run dir found in it at any depth (runfiles.is_run_dir), named by its path.

A job dir without summary.json is `running` while its run dir lock is held (rundir.lock_is_held: the kernel drops a
killed job's lock, so a killed job reads as failed), else `failed`; a planned job without a dir `never ran`. The plan
is Hydra's multirun.yaml: the basic sweeper's cartesian product of the sweep's overrides.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from prefopt.core.rundir import lock_is_held
from prefopt.core.runfiles import CHECKPOINTS, ERROR_FILE, MULTIRUN_FILE, SUMMARY_FILE, WANDB_DIR, is_run_dir
from prefopt.observe.metric_names import with_current_names
from prefopt.observe.plots import RunDirError, run_label, run_overrides

# column -> summary.json key
SUMMARY_COLUMNS = {
    "dChosen": "delta/chosen",
    "dRejected": "delta/rejected",
    "dOthers": "delta/others",
    "dGreedy": "delta/greedy",
    "eval_accuracy": "eval/rewards/accuracies",
    "steps": "steps",
}

NEVER_RAN, RUNNING = "never ran", "running"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"  # multirun.yaml's hydra.sweeper._target_


def job_dirs(sweep_dir: Path, allow_none: bool = False) -> list[Path]:
    """The job subdirs (named 0, 1, 2, ...) in job order."""
    if not sweep_dir.is_dir():
        raise RunDirError(f"{sweep_dir}: not a directory; give a sweep dir made by `prefopt train -m`")
    jobs = sorted(
        (path for path in sweep_dir.iterdir() if path.is_dir() and path.name.isdigit()), key=lambda path: int(path.name)
    )
    if not jobs and not allow_none:
        raise RunDirError(
            f"{sweep_dir}: no job dirs (0, 1, 2, ...) inside; give the sweep dir of a `prefopt train -m` run"
        )
    return jobs


def planned_jobs(sweep_dir: Path) -> Optional[list[list[str]]]:
    """The overrides of every job the sweep planned, in job order (Hydra's basic sweeper: the cartesian product of
    hydra.sweeper.params and the command line's overrides); None when unknown (no multirun.yaml, another sweeper, or
    a Hydra whose basic sweeper moved: it is Hydra's internal module, imported only when a sweep names it)."""
    hydra_cfg = (load_yaml(sweep_dir / MULTIRUN_FILE) or {}).get("hydra") or {}
    task = (hydra_cfg.get("overrides") or {}).get("task")
    sweeper = hydra_cfg.get("sweeper") or {}
    if task is None or sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    except ImportError:
        return None
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    try:
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides([*params, *task]), None)
    except HydraException:  # a sweep the parser cannot expand without the config (glob): the job dirs say what ran
        return None
    return [list(job) for batch in batches for job in batch]


def read_summary(job_dir: Path) -> Optional[dict[str, Any]]:
    """summary.json with today's metric names: a job run before prefopt took TRL's names
    (eval/rewards/accuracy) reports next to new ones (eval/rewards/accuracies), not as a blank."""
    path = job_dir / SUMMARY_FILE
    try:
        return with_current_names(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def job_failed(job_dir: Path, summary: Optional[dict[str, Any]]) -> bool:
    """A job without a summary never finished; one with an error.txt crashed after writing it."""
    return summary is None or (job_dir / ERROR_FILE).exists()


def job_row(job_dir: Path, planned: Optional[list[str]] = None, name: Any = None) -> dict[str, Any]:
    """planned: the job's overrides as the sweep planned them, shown for a job that failed before it recorded its
    own; name: the row's name (default: the job's number)."""
    summary = read_summary(job_dir)
    failed = job_failed(job_dir, summary)
    label = " ".join(planned) if planned and not run_overrides(job_dir) else run_label(job_dir)
    row: dict[str, Any] = {"job": int(job_dir.name) if name is None else name, "overrides": label, "dir": job_dir}
    row |= {column: (summary or {}).get(key) for column, key in SUMMARY_COLUMNS.items()}
    row["status"] = (RUNNING if summary is None and lock_is_held(job_dir) else "failed") if failed else "ok"
    return row


def never_ran_row(number: int, overrides: list[str]) -> dict[str, Any]:
    return {
        "job": number,
        "overrides": " ".join(overrides),
        **{column: None for column in SUMMARY_COLUMNS},
        "status": NEVER_RAN,
        "dir": None,
        "planned": overrides,
    }


def sweep_rows(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """(a row per job, planned or started, in job order; the job dirs)."""
    planned = planned_jobs(sweep_dir) if sweep_dir.is_dir() else None
    jobs = job_dirs(sweep_dir, allow_none=bool(planned))
    planned_by_number = dict(enumerate(planned or []))
    rows = {int(job.name): job_row(job, planned_by_number.get(int(job.name))) for job in jobs}
    for number, overrides in planned_by_number.items():
        rows.setdefault(number, never_ran_row(number, overrides))
    return [rows[number] for number in sorted(rows)], jobs


def is_sweep_dir(directory: Path) -> bool:
    """Hydra's multirun dir: its record of the sweep, or job dirs named 0, 1, 2, ..."""
    return (directory / MULTIRUN_FILE).is_file() or bool(job_dirs(directory, allow_none=True))


def natural_key(path: Path) -> tuple:
    """run-2 before run-10: the numbers in a path compare as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix()))


def run_dirs_under(folder: Path) -> list[Path]:
    """Every run dir in `folder` (itself included) at any depth, in natural path order; a run dir's own subdirs
    (checkpoints, wandb, .hydra) are not searched."""
    found = []
    for root, subdirs, _ in os.walk(folder):
        if is_run_dir(Path(root)):
            found.append(Path(root))
            subdirs.clear()
            continue
        subdirs[:] = [name for name in subdirs if not name.startswith(".") and name not in (CHECKPOINTS, WANDB_DIR)]
    return sorted(found, key=lambda path: natural_key(path.relative_to(folder)))


def folder_rows(folder: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """(a row per run dir in the folder, named by its path inside it; the run dirs)."""
    runs = run_dirs_under(folder)
    if not runs:
        raise RunDirError(
            f"{folder}: no sweep jobs (0, 1, 2, ...) and no run dirs inside (a dir with config.yaml beside "
            "metrics.jsonl or summary.json, at any depth); give a sweep dir of `prefopt train -m` or a folder of runs"
        )
    return [job_row(run, name=run.relative_to(folder).as_posix() or ".") for run in runs], runs


def report_rows(directory: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """`prefopt report DIR`'s rows and the run dirs behind them: a sweep's jobs (sweep_rows), else the run dirs in
    the folder (folder_rows)."""
    if not directory.is_dir():
        raise RunDirError(f"{directory}: not a directory; give a sweep dir of `prefopt train -m` or a folder of runs")
    return sweep_rows(directory) if is_sweep_dir(directory) else folder_rows(directory)


def load_yaml(path: Path) -> Optional[dict]:
    """A YAML file as plain containers (interpolations left as text), or None when absent."""
    if not path.is_file():
        return None
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as error:  # OmegaConf raises several types for a damaged file
        raise RunDirError(f"{path}: not readable YAML ({error}); the job dir is damaged") from None
