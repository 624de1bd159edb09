"""Ctrl-C and SIGTERM during training, taken at a step boundary by every rank (trainer.save_on_interrupt)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch

from prefopt.core.distributed import DistInfo
from prefopt.core.errors import stop_exception
from prefopt.core.slurm import in_slurm_task, preemption

log = logging.getLogger("prefopt")


class DeferredInterrupt:
    """Ctrl-C or SIGTERM during training (trainer.save_on_interrupt): the first one only sets a flag, which the loop
    reads at the end of a step; every rank takes it at that same step (one all-reduce: any rank's signal stops all),
    checkpoints that step and stops, so no update is ever cut in half (an interrupt inside the optimizer's step
    would leave half-updated weights). A second signal stops at once. Inside a SLURM task SIGTERM belongs to
    preemption (prefopt/core/slurm.py), which checkpoints and requeues."""

    def __init__(self, enabled: bool):
        self.received = 0  # the first stop signal's number
        self.previous: dict[int, Any] = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, *(() if in_slurm_task() else (signal.SIGTERM,))):
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received:
            raise stop_exception(signum)
        self.received = signum
        name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s: stopping after this step with a checkpoint (again to stop at once)", name)

    def requested(self, dist: DistInfo) -> tuple[bool, int]:
        """(SLURM's time-limit warning or SIGTERM reached some rank: checkpoint and requeue, prefopt/core/slurm.py;
        the stop signal some rank received, 0 for none). Every rank calls this at every step: one all-reduce carries
        both, so a multi-rank run pays one small collective per step for them, and a single rank none."""
        flags = torch.tensor([*preemption.local_flags(), float(self.received)], dtype=torch.float64)
        warned, terminated, stop = dist.all_reduce(flags, torch.distributed.ReduceOp.MAX).tolist()
        return bool(warned or terminated), int(stop)

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous = {}
