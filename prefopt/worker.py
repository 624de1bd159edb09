"""Worker side: read the frozen config of a run dir and train. Never composes with Hydra.

    python -m prefopt.worker RUN_DIR/config.yaml [--local_rank=N] [--command eval]
    srun python -m prefopt.worker RUN_DIR/config.yaml       (scripts/slurm/train.sbatch: every task is a rank)

The DeepSpeed launcher appends --local_rank; ranks come from the environment, so it is ignored.

A rank of `prefopt train` (torchrun under it) dies with it (prefopt/proctree.py), holds the run dir's ranks lock
for its life, and tells it how it ended in a transient report (EXIT_REPORT) instead of a traceback: a user error
as its one line (the parent ends the ranks and prints it, exit 2), a stop (SIGTERM, Ctrl-C) after its checkpoint.
Each report names its launch (PREFOPT_LAUNCH_ID): a parent reads only its own launch's reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from prefopt import proctree, rundir
from prefopt.config import Config
from prefopt.distributed import export_ranks, leave_distributed, record_rank
from prefopt.errors import USER_ERRORS, Terminated
from prefopt.fileutil import atomic_write_text
from prefopt.slurm import check_job_shape, in_slurm_task, in_submitit_task, preemption, restart_count

ERROR_FILE = "error.txt"  # rank 0's; other ranks write error-rank<N>.txt
EXIT_REPORT = ".rank{rank}.exit.json"  # a rank of `prefopt train`: how it ended, read (and removed) by the parent
USER_ERROR_EXIT_CODE = 2
REPORTED_WAIT_S = 60.0  # a rank that reported a user error waits this long for the parent to end the launch
WORKER_COMMANDS = (
    "train",
    "eval",
)  # what a worker does with the frozen config: train it, or evaluate it (`prefopt eval`)


def load_frozen_config(config_path: str | Path):
    """The resolved config.yaml of a run dir, typed again by the schema."""
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config_path))


def current_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def launched_by_prefopt() -> bool:
    """This process is a rank that `prefopt train` started through torchrun (it reads this rank's exit report)."""
    return bool(os.environ.get(proctree.LAUNCH_ID_ENV))


def write_exit_report(run_dir: Path, rank: int, **outcome: Any) -> None:
    """This rank's EXIT_REPORT for the `prefopt train` that launched it: outcome is user_error= and message=, or stopped=."""
    report = {"launch": os.environ[proctree.LAUNCH_ID_ENV], "rank": rank, "host": proctree.host_name(), **outcome}
    atomic_write_text(run_dir / EXIT_REPORT.format(rank=rank), json.dumps(report))


def run_worker(config_path: str | Path, command: str = "train", as_rank: bool = False) -> dict[str, Any]:
    """Train (command="eval": evaluate, prefopt/evalrun.py); on failure leave this rank's traceback in the run dir
    (the launcher and `prefopt report` read it), except for a user error that the parent prints instead.
    as_rank: a process of its own (torchrun, srun): it holds the run dir's ranks lock until it exits."""
    if command == "eval":
        from prefopt.evalrun import evaluate_run as body
    else:
        from prefopt.trainer import train as body

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
            name = ERROR_FILE if rank == 0 else ERROR_FILE.replace(".txt", f"-rank{rank}.txt")
            atomic_write_text(
                Path(cfg.run_dir) / name, f"rank {rank} on {proctree.host_name()}:\n{traceback.format_exc()}"
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prefopt-worker", description=__doc__)
    parser.add_argument("config", help="a run dir's config.yaml")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="ignored (ranks come from the environment)"
    )
    parser.add_argument(
        "--command",
        choices=WORKER_COMMANDS,
        default="train",
        help="train the run (default), or evaluate it (prefopt eval)",
    )
    args = parser.parse_args(argv)
    if in_slurm_task() and not in_submitit_task():
        preemption.install(
            deferred=False
        )  # an sbatch job (scripts/slurm/train.sbatch): its time-limit warning requeues it
    proctree.follow_launcher()  # under prefopt train: die with it, or exit now if it is already gone
    rank = current_rank()
    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] %(message)s")
    run_dir = Path(args.config).resolve().parent
    try:
        run_worker(args.config, args.command, as_rank=True)
        exit_finished_rank()
    except USER_ERRORS as error:
        if not launched_by_prefopt():
            print(f"prefopt: error: {error}", file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT_CODE) from None
        kind = next(cls.__name__ for cls in type(error).__mro__ if cls in USER_ERRORS)
        write_exit_report(run_dir, rank, user_error=kind, message=str(error))
        # exiting non-zero would make torchrun print a traceback of its own: the parent ends this launch instead
        time.sleep(REPORTED_WAIT_S)
        os._exit(USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: stopped (after the checkpoint of the last whole step)
        signum = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
        if not launched_by_prefopt():
            raise SystemExit(128 + signum) from None
        write_exit_report(run_dir, rank, stopped=int(signum))
        raise SystemExit(0) from None  # quietly: the parent says how the run stopped and how to resume it


if __name__ == "__main__":
    main()
