"""Ranks, process group, and the few collectives the trainer needs.

Ranks come from the environment only (torchrun / SLURM set RANK, LOCAL_RANK, WORLD_SIZE), so the
same worker body runs inline, under torchrun, and inside a SLURM task.
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
        if not self.initialized or self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def uses_deepspeed(hardware_cfg: DictConfig) -> bool:
    return hardware_cfg.engine == "deepspeed"


def init_distributed(hardware_cfg: DictConfig) -> DistInfo:
    """Join the process group when DeepSpeed or several ranks need one; a single torch process needs none."""
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
