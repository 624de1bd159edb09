"""Ranks, process group, and the few collectives the trainer needs.

Ranks come from the environment only (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; inside an srun task
they are derived from SLURM's variables), so the same worker body runs inline, under torchrun, and as
the SLURM tasks of a job, on any number of nodes, with no launcher nested inside.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import DictConfig


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    initialized: bool = False  # a process group exists (DeepSpeed runs, or more than one rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def gather_cat(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-rank 1-D tensor over ranks (equal sizes), so means are over the global batch."""
        if not self.initialized or self.world_size == 1:
            return values
        parts = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(parts, values.contiguous())
        return torch.cat(parts)

    def sum(self, value: float) -> float:
        return self._all_reduce(value, dist.ReduceOp.SUM)

    def minimum(self, value: float) -> float:
        return self._all_reduce(value, dist.ReduceOp.MIN)

    def _all_reduce(self, value: float, op) -> float:
        if not self.initialized or self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total, op=op)
        return float(total)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07" (what `scontrol show hostnames` prints first)."""
    first = nodelist.split(",")[0]
    if "[" not in first:
        return first
    prefix, rest = nodelist.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + suffix.split(",")[0]


def export_slurm_ranks() -> None:
    """RANK/LOCAL_RANK/WORLD_SIZE from an srun task's SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS; the master is the
    job's first node, on a port derived from the job id (the same in every task, and again after a requeue).
    Overwrites: values inherited from the submitting shell (an earlier local run) must not win inside a job."""
    env = os.environ
    env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_LOCALID"], env["SLURM_NTASKS"]
    env["LOCAL_WORLD_SIZE"] = str(int(env["SLURM_NTASKS"]) // int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1"))))
    env["MASTER_ADDR"] = first_slurm_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1")
    env["MASTER_PORT"] = str(20_000 + int(env.get("SLURM_JOB_ID", "0")) % 40_000)


def uses_deepspeed(hardware_cfg: DictConfig) -> bool:
    return hardware_cfg.engine == "deepspeed"


def init_distributed(hardware_cfg: DictConfig) -> DistInfo:
    """Join the process group when DeepSpeed or several ranks need one; a single torch process needs none."""
    in_srun_task = "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ
    if in_srun_task and (hardware_cfg.launcher == "slurm" or "RANK" not in os.environ):
        export_slurm_ranks()  # hardware.launcher=slurm, or `srun prefopt worker` with any config
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if world_size == 1 and not uses_deepspeed(hardware_cfg):
        return info
    if hardware_cfg.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, explicitly
    if world_size == 1:  # DeepSpeed still wants a process group; without these it tries MPI
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        import deepspeed

        backend = "gloo" if hardware_cfg.device == "cpu" else "nccl"
        deepspeed.init_distributed(dist_backend=backend)
    info.initialized = True
    return info


def device_for(hardware_cfg: DictConfig, info: DistInfo) -> torch.device:
    if hardware_cfg.device == "cuda":
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")
