"""Worker side: read the frozen config of a run dir and train. Never composes with Hydra.

    python -m prefopt.worker RUN_DIR/config.yaml [--local_rank=N] [--command eval]
    srun python -m prefopt.worker RUN_DIR/config.yaml       (scripts/slurm/train.sbatch: every task is a rank)

The DeepSpeed launcher appends --local_rank; ranks come from the environment, so it is ignored.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import traceback
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from prefopt import rundir
from prefopt.config import Config
from prefopt.distributed import export_ranks, leave_distributed, record_rank
from prefopt.fileutil import atomic_write_text
from prefopt.slurm import check_job_shape, in_slurm_task, in_submitit_task, preemption, restart_count

ERROR_FILE = "error.txt"  # rank 0's; other ranks write error-rank<N>.txt
WORKER_COMMANDS = ("train", "eval")  # what a worker does with the frozen config: train it, or evaluate it (`prefopt eval`)


def load_frozen_config(config_path: str | Path):
    """The resolved config.yaml of a run dir, typed again by the schema."""
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config_path))


def run_worker(config_path: str | Path, command: str = "train") -> dict[str, Any]:
    """Train (command="eval": evaluate, prefopt/evalrun.py); on failure leave this rank's traceback in the run dir
    (the launcher and `prefopt report` read it)."""
    if command == "eval":
        from prefopt.evalrun import evaluate_run as body
    else:
        from prefopt.trainer import train as body

    cfg = load_frozen_config(config_path)
    if restart_count() and cfg.trainer.resume is False and command == "train":
        # SLURM requeued this job (time limit, preemption, `scontrol requeue`): continue from its last checkpoint
        logging.getLogger("prefopt").warning("SLURM requeued this job (restart %d): resuming from the run dir's last checkpoint", restart_count())
        cfg.trainer.resume = True
    try:
        check_job_shape(cfg.hardware)
        export_ranks(cfg.hardware)  # inside an srun task RANK & co. come from SLURM, before anything reads them
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            rundir.acquire(Path(cfg.run_dir))  # an sbatch job's rank 0 owns the run dir (a no-op under prefopt train, which holds it)
        record_rank(Path(cfg.run_dir), cfg.hardware)  # RUN_DIR/ranks.json: which host runs this rank
        result = body(cfg, Path(cfg.run_dir))
        leave_distributed()
        return result
    except BaseException as error:
        if not isinstance(error, (KeyboardInterrupt, SystemExit)):
            rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
            name = ERROR_FILE if rank == 0 else ERROR_FILE.replace(".txt", f"-rank{rank}.txt")
            atomic_write_text(Path(cfg.run_dir) / name, f"rank {rank} on {socket.gethostname()}:\n{traceback.format_exc()}")
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prefopt-worker", description=__doc__)
    parser.add_argument("config", help="a run dir's config.yaml")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="ignored (ranks come from the environment)")
    parser.add_argument("--command", choices=WORKER_COMMANDS, default="train", help="train the run (default), or evaluate it (prefopt eval)")
    args = parser.parse_args(argv)
    if in_slurm_task() and not in_submitit_task():
        preemption.install(deferred=False)  # an sbatch job (scripts/slurm/train.sbatch): its time-limit warning requeues it
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] %(message)s")
    run_worker(args.config, args.command)


if __name__ == "__main__":
    main()
