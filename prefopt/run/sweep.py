"""One job of a multirun (`prefopt train -m`): its W&B run in the sweep's group, its objective, its failure.

Jobs run one after another in the `prefopt train -m` process (Hydra's basic launcher, the Optuna
sweeper), or each as a SLURM job (hydra/launcher=slurm; then this runs in every task of the job).
Every job has its own run dir: the sweep dir (microsecond timestamp) / the job number.

A job that fails leaves its traceback in its run dir (error.txt; `prefopt report` marks it failed)
and in its log. sweep.continue_on_failure=true: the other jobs run, and Hydra fails the sweep at its
end with the error (Optuna records a failed trial instead: hydra.sweeper.max_failure_rate). false:
the first failure stops the sweep.
"""

from __future__ import annotations

import gc
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig

from prefopt.core import slurm
from prefopt.core.errors import ConfigError
from prefopt.core.fileutil import atomic_write_text
from prefopt.core.rundir import existing_run
from prefopt.core.runfiles import ERROR_FILE, ERROR_GLOB
from prefopt.run.eval_run import prepare_eval, prepare_inspect
from prefopt.run.launch import dispatch, prepare_run

log = logging.getLogger("prefopt")


def objective_value(cfg: DictConfig, summary: Mapping[str, Any], required: bool) -> Optional[float]:
    """summary[trainer.objective] as a float: what `prefopt train` returns and a sweeper optimizes."""
    key = cfg.trainer.objective
    if key in summary and summary[key] is not None:
        return float(summary[key])
    if "stopped_at" in summary:  # trainer.stop_after: the run stopped early on purpose, there is no final eval
        return None
    message = f"trainer.objective={key} is not in the run's summary; choose one of: {', '.join(sorted(summary))}"
    if required and summary:
        raise ConfigError(message)
    if summary:
        log.warning(message)
    return None


def name_wandb_run(cfg: DictConfig, sweep_dir: str, overrides: list[str], job_num: int) -> None:
    """One W&B group per sweep (the sweep dir's name), each run named by its overrides, unless the user set them."""
    wandb_cfg = cfg.logger.wandb
    if wandb_cfg.group is None:
        wandb_cfg.group = Path(sweep_dir).name
    if wandb_cfg.name is None:
        wandb_cfg.name = " ".join(overrides) or f"job {job_num}"


def ensure_error_file(run_dir: Path, error: BaseException) -> None:
    """The worker writes error.txt when training fails; a job that failed before it (bad config) gets one here."""
    if not any(run_dir.glob(ERROR_GLOB)):
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        atomic_write_text(run_dir / ERROR_FILE, text)


def free_job_state(num_threads: int) -> None:
    """What one job must not pass to the next in the same process: W&B run, models, thread count."""
    import torch

    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1)
    except ImportError:
        pass
    torch.set_num_threads(num_threads)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_job(cfg: DictConfig, hydra_cfg: DictConfig, command: str = "train") -> Optional[float]:
    """Prepare and train (command="eval": evaluate, `prefopt eval -m`) one sweep job (here, or as this SLURM
    task's rank); returns its objective."""
    import torch

    job_dir, overrides = Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task)
    # each freezes the job's run dir (eval and inspect with a policy: cfg becomes the run's)
    prepare = {"train": prepare_run, "eval": prepare_eval, "inspect": prepare_inspect}[command]
    name_wandb_run(cfg, hydra_cfg.sweep.dir, overrides, hydra_cfg.job.num)
    in_slurm_job = slurm.in_submitit_task()
    num_threads = torch.get_num_threads()
    run_dir = job_dir
    prepared = False
    try:
        if in_slurm_job:  # every task of the job runs this: rank 0 freezes the run dir, the others wait for it
            run_dir = slurm.prepare_once(lambda: prepare(cfg, job_dir, overrides), job_dir)
        else:
            if cfg.hardware.launcher == "slurm":
                raise ConfigError(
                    f"hardware={cfg.hardware.name} (launcher: slurm) runs as SLURM tasks: add hydra/launcher=slurm "
                    "(or slurm_local) to the sweep, or use a local hardware preset"
                )
            run_dir = prepare(cfg, job_dir, overrides)
        prepared = True
        summary = dispatch(cfg, run_dir, command)
        return objective_value(cfg, summary, required=True)
    except Exception as error:
        if (
            prepared or in_slurm_job or not existing_run(run_dir)
        ):  # a refused resume or reuse leaves the earlier run's record as it was
            ensure_error_file(run_dir, error)
        log.error(
            "job %s failed (%s):\n%s",
            hydra_cfg.job.num,
            " ".join(overrides),
            "".join(traceback.format_exception(error)),
        )
        if in_slurm_job:
            # a non-zero exit: srun ends the job's other ranks, sacct says FAILED, the launcher reports error.txt
            raise SystemExit(1) from None
        if not cfg.sweep.continue_on_failure:
            print(
                f"prefopt: error: job {hydra_cfg.job.num} failed and sweep.continue_on_failure=false stops the "
                f"sweep: {error}",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        raise  # Hydra records the job as failed and runs the others
    finally:
        free_job_state(num_threads)
