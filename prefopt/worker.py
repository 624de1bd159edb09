"""Entry point of a worker process: read the frozen config of a run dir and train it. Never composes with Hydra.

    python -m prefopt.worker RUN_DIR/config.yaml [--local_rank=N] [--command eval]
    srun python -m prefopt.worker RUN_DIR/config.yaml       (scripts/slurm/train.sbatch: every task is a rank)

The DeepSpeed launcher appends --local_rank; ranks come from the environment, so it is ignored. The body (which
recipe runs, the exit reports a rank leaves for `prefopt train`) lives in prefopt/run/worker.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from prefopt.core import proctree
from prefopt.core.errors import USER_ERRORS, Terminated
from prefopt.core.slurm import in_slurm_task, in_submitit_task, preemption
from prefopt.run.worker import (
    RECIPES,
    REPORTED_WAIT_S,
    USER_ERROR_EXIT_CODE,
    current_rank,
    exit_finished_rank,
    launched_by_prefopt,
    run_worker,
    write_exit_report,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prefopt-worker", description=__doc__)
    parser.add_argument("config", help="a run dir's config.yaml")
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="ignored (ranks come from the environment)"
    )
    parser.add_argument(
        "--command",
        choices=sorted(RECIPES),
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
