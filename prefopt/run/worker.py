"""The worker's body, behind `python -m prefopt.worker` (prefopt/worker.py) and `prefopt train`'s in-process launch:
read the frozen config of a run dir, run its recipe (recipes/train.py or recipes/evaluate.py), and say how it ended.

A rank of `prefopt train` (torchrun under it) dies with it (core/proctree.py), holds the run dir's ranks lock for
its life, and tells it how it ended in a transient report (runfiles.EXIT_REPORT) instead of a traceback: a user error
as its one line (the parent ends the ranks and prints it, exit 2), a stop (SIGTERM, Ctrl-C) after its checkpoint.
Each report names its launch (PREFOPT_LAUNCH_ID): a parent reads only its own launch's reports.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from prefopt.core import proctree, rundir
from prefopt.core.distributed import export_ranks, leave_distributed, record_rank
from prefopt.core.errors import USER_ERRORS, ConfigError
from prefopt.core.fileutil import atomic_write_text
from prefopt.core.runfiles import EXIT_REPORT, rank_error_file
from prefopt.core.slurm import check_job_shape, restart_count
from prefopt.recipes.evaluate import evaluate_run
from prefopt.recipes.inspect import inspect_run
from prefopt.recipes.train import train
from prefopt.run.config import Config

USER_ERROR_EXIT_CODE = 2
REPORTED_WAIT_S = 60.0  # a rank that reported a user error waits this long for the parent to end the launch
RECIPES = {
    "train": train,
    "eval": evaluate_run,
    "inspect": inspect_run,
}  # what a worker does with the frozen config: train it, evaluate it (`prefopt eval`), inspect its pairs


def load_frozen_config(config_path: str | Path):
    """The resolved config.yaml of a run dir, typed again by the schema. A frozen config holds every key, so the
    keys whose defaults live in conf/ (MISSING in the schema) all have values; one it lacks is named, not guessed."""
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config_path))
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{config_path} has no value for {missing[0]} (a config frozen by another prefopt version?); "
            f"add {missing[0]}: VALUE to it, or start the run again"
        )
    return cfg


def current_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def launched_by_prefopt() -> bool:
    """This process is a rank that `prefopt train` started through torchrun (it reads this rank's exit report)."""
    return bool(os.environ.get(proctree.LAUNCH_ID_ENV))


def write_exit_report(run_dir: Path, rank: int, **outcome: Any) -> None:
    """This rank's EXIT_REPORT for the `prefopt train` that launched it: outcome is user_error= and message=, or
    stopped=."""
    report = {"launch": os.environ[proctree.LAUNCH_ID_ENV], "rank": rank, "host": proctree.host_name(), **outcome}
    atomic_write_text(run_dir / EXIT_REPORT.format(rank=rank), json.dumps(report))


def run_worker(config_path: str | Path, command: str = "train", as_rank: bool = False) -> dict[str, Any]:
    """Run the recipe (RECIPES: recipes/train.py; recipes/evaluate.py for `prefopt eval`); on failure leave this
    rank's traceback in the run dir (the launcher and `prefopt report` read it), except for a user error that the
    parent prints instead.
    as_rank: a process of its own (torchrun, srun): it holds the run dir's ranks lock until it exits."""
    body = RECIPES[command]
    cfg = load_frozen_config(config_path)
    if restart_count() and cfg.trainer.resume is False and command == "train":
        # SLURM requeued this job (time limit, preemption, `scontrol requeue`): continue from its last checkpoint
        logging.getLogger("prefopt").warning(
            "SLURM requeued this job (restart %d): resuming from the run dir's last checkpoint", restart_count()
        )
        cfg.trainer.resume = True
    try:
        check_job_shape(cfg.hardware)
        export_ranks(cfg.hardware)  # inside an srun task RANK & co. come from SLURM, before anything reads them
        if current_rank() == 0:
            # an sbatch job's rank 0 owns the run dir (a no-op under prefopt train, which holds it); its peers may
            # already hold the ranks lock
            rundir.acquire(Path(cfg.run_dir), wait_for_ranks=False)
        if as_rank:
            rundir.hold_for_rank(Path(cfg.run_dir))
        record_rank(Path(cfg.run_dir), cfg.hardware)  # RUN_DIR/ranks.json: which host runs this rank
        result = body(cfg, Path(cfg.run_dir))
        leave_distributed()
        return result
    except BaseException as error:
        reported = isinstance(error, USER_ERRORS) and as_rank and launched_by_prefopt()  # the parent prints it
        if not isinstance(error, (KeyboardInterrupt, SystemExit)) and not reported:
            rank = current_rank()
            atomic_write_text(
                Path(cfg.run_dir) / rank_error_file(rank),
                f"rank {rank} on {proctree.host_name()}:\n{traceback.format_exc()}",
            )
        raise


def exit_finished_rank() -> None:
    """Leave a finished rank without the interpreter's teardown. gloo's (and DeepSpeed's shared-memory comm's) C++
    threads can abort in static destructors at exit ("terminate called without an active exception", SIGABRT) even
    after leave_distributed synchronised and destroyed the group (seen in CI: a finished 2-rank run then failed its
    launch). Everything the run wrote is already closed (files atomic, W&B finished): flush and go."""
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        try:
            wandb.teardown()  # its service process, which an atexit hook would otherwise stop
        except Exception:  # noqa: BLE001 (the run is finished and recorded: nothing here may fail it)
            pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
