"""Inside a SLURM job: where this process stands, the run dir prepared once per job, and preemption.

The same worker body runs as every task (rank) of a SLURM job, whether the job came from a Hydra
sweep (hydra/launcher=slurm: the Hydra task function runs in every task) or from an sbatch script
(scripts/slurm/train.sbatch: `srun prefopt worker RUN_DIR/config.yaml`). Ranks come from SLURM's
environment (prefopt.core.distributed.export_slurm_ranks). A requeued job (time limit, preemption,
`scontrol requeue`) starts again in the same run dir and resumes from its last checkpoint.

Imports no Hydra: workers use it too. The Hydra launcher lives in hydra_plugins/prefopt_slurm_launcher.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from prefopt.core.errors import ConfigError
from prefopt.core.fileutil import atomic_write_text
from prefopt.core.runfiles import PREPARED_FILE

log = logging.getLogger("prefopt")


def in_slurm_task() -> bool:
    """This process is one task of a job step (srun), not a login shell and not the batch script itself."""
    return "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ


def in_submitit_task() -> bool:
    """This process is a task of a job submitted by submitit (hydra/launcher=slurm)."""
    return in_slurm_task() and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def restart_count() -> int:
    """How often SLURM has requeued this job (0 on the first start)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def job_attempt() -> str:
    """Names one start of one job, the same in all of its tasks: "<job id>.<restart count>"."""
    return f"{os.environ.get('SLURM_JOB_ID', 'nojob')}.{restart_count()}"


def check_job_shape(hardware_cfg) -> None:
    """A job's tasks must be the config's ranks (hardware.nodes x hardware.gpus_per_node), or the batch split is
    wrong."""
    if not in_slurm_task() or hardware_cfg.launcher != "slurm":
        return
    tasks, ranks = int(os.environ.get("SLURM_NTASKS", "1")), hardware_cfg.nodes * hardware_cfg.gpus_per_node
    if tasks != ranks:
        raise ConfigError(
            f"this SLURM job has {tasks} tasks but hardware={hardware_cfg.name} needs {ranks} ranks "
            f"({hardware_cfg.nodes} nodes x {hardware_cfg.gpus_per_node}): submit it with "
            f"--nodes={hardware_cfg.nodes} --ntasks-per-node={hardware_cfg.gpus_per_node}"
        )


def prepare_once(prepare: Callable[[], Path], job_dir: Path, timeout_s: float = 1800.0) -> Path:
    """Rank 0 runs `prepare` (validate, resolve the model, freeze config.yaml) and records the outcome in
    job_dir/.prepared; the job's other tasks wait for that record (bounded) instead of racing it."""
    marker = Path(job_dir) / PREPARED_FILE
    attempt = job_attempt()
    if int(os.environ.get("SLURM_PROCID", "0")) == 0:
        try:
            run_dir = prepare()
        except Exception as error:
            atomic_write_text(marker, f"{attempt}\nerror\n{error}\n")
            raise
        atomic_write_text(marker, f"{attempt}\nok\n{run_dir}\n")
        return run_dir
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = marker.read_text().splitlines() if marker.is_file() else []
        if lines and lines[0] == attempt:  # written by this start of the job, not a previous one
            if lines[1] == "ok":
                return Path(lines[2])
            raise RuntimeError("rank 0 could not prepare the run: " + "\n".join(lines[2:]))
        time.sleep(0.5)
    raise TimeoutError(f"rank 0 did not prepare the run dir within {timeout_s:.0f} s (no {marker} for job {attempt})")


class Preemption:
    """SLURM's warning before a time limit or a preemption: the job checkpoints, requeues itself, and the
    requeued job resumes from its run dir (prefopt.worker sets trainer.resume when SLURM_RESTART_COUNT > 0).

    The warning is USR2 (`--signal=USR2@SECONDS`; submitit's default; SUBMITIT_PREEMPT_SIGNAL changes it).
    With the trainer hook, the flag is polled once per step and the checkpoint is written at that step:

        preempted, stop = interrupt.requested(dist)  # one all-reduce: these flags and the trainer's Ctrl-C/SIGTERM
        if preempted:  # SLURM time limit / preemption: checkpoint at this step, then requeue
            save(step)  # checkpoint_state of this step (trainer.py)
            preemption.requeue(dist)

    Outside a SLURM task the flags stay 0 and `requested` is False. Inside one, the first poll takes over
    USR2 and SIGTERM (scancel, `scontrol requeue`, preemption) and from then on all ranks agree on the
    flags every step (one small all-reduce), so they checkpoint at the same step. After a USR2, rank 0
    requeues the job (through submitit's handler under hydra/launcher=slurm, which also re-pickles the
    job, else `scontrol requeue`); after a SIGTERM SLURM is already ending or requeueing the job.

    Before any poll (a worker without the hook, or a warning during start-up) the warning acts at once:
    `install(deferred=False)` (what `prefopt worker` does inside an sbatch job; submitit's own handler
    does the same under hydra/launcher=slurm) requeues the job immediately, and the requeued job resumes
    from the last periodic checkpoint (trainer.save_every).
    """

    def __init__(self) -> None:
        self.received: set[int] = set()
        self.previous_handlers: dict[int, object] = {}
        self.deferred = False  # true once the trainer polls: a signal only sets a flag

    @staticmethod
    def warning_signal() -> int:
        return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))

    def install(self, deferred: bool) -> None:
        signals = (self.warning_signal(), signal.SIGTERM) if deferred else (self.warning_signal(),)
        for signum in signals:
            if signum not in self.previous_handlers:
                self.previous_handlers[signum] = signal.signal(signum, self.record)
        self.deferred = self.deferred or deferred

    def record(self, signum: int, frame=None) -> None:
        self.received.add(signum)
        if self.deferred:
            log.warning("received %s: checkpointing at the end of this step", signal.Signals(signum).name)
        elif signum == self.warning_signal() and int(os.environ.get("SLURM_PROCID", "0")) == 0:
            log.warning(
                "received %s before the trainer polls for it: requeueing now (resume from the last checkpoint)",
                signal.Signals(signum).name,
            )
            self.requeue_job()

    def local_flags(self) -> list[float]:
        """This rank's [got the warning signal, got SIGTERM], for an all-reduce that makes every rank agree (the
        trainer's per-step one carries its stop flag too: train/interrupt.py DeferredInterrupt.requested). Inside a
        SLURM task the first call arms the deferred handlers; elsewhere both stay 0."""
        if not self.deferred and in_slurm_task():
            self.install(deferred=True)
        return [float(self.warning_signal() in self.received), float(signal.SIGTERM in self.received)]

    def _flags(self, dist) -> tuple[bool, bool]:
        """(some rank got the warning signal, some rank got SIGTERM)."""
        import torch

        flags = dist.all_reduce(torch.tensor(self.local_flags(), dtype=torch.float64))
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def requeue_job(self) -> None:
        """Rank 0: requeue this job (submitit's handler when submitit runs it: it re-pickles the job first), then
        leave."""
        warning = self.warning_signal()
        submitit_handler = self.previous_handlers.get(warning)
        if callable(submitit_handler):
            submitit_handler(warning, None)  # dumps the resubmission, `scontrol requeue`, sys.exit
        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
        log.warning("requeued SLURM job %s; it resumes from its run dir's last checkpoint", job_id)
        raise SystemExit(0)

    def requeue(self, dist, wait_s: float = 300.0) -> None:
        """After the checkpoint: rank 0 requeues the job after a warning; the others wait to be ended."""
        warned, _ = self._flags(dist)
        if warned and dist.rank == 0:
            self.requeue_job()
        if warned:
            time.sleep(wait_s)  # rank 0 is requeueing the job, which ends this task; leaving first could fail the job
        raise SystemExit(143)


preemption = Preemption()
