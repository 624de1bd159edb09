"""Ranks, process group, and the few collectives the trainer needs.

Ranks come from the environment only (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; inside an srun task
they are derived from SLURM's variables), so the same worker body runs inline, under torchrun, and as
the SLURM tasks of a job, on any number of nodes, with no launcher nested inside.

Across hosts: the master is the job's first node (SLURM) or hardware.rdzv_endpoint (torchrun, one
`prefopt train` per host, hardware.node_rank 0 owning the run dir); gloo is bound to the interface that
routes to the master, and every rank records where it ran in RUN_DIR/ranks.json.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from prefopt.core.fileutil import atomic_write_json, exclusive_lock
from prefopt.core.proctree import host_name
from prefopt.core.runfiles import CONFIG_FILE, RANKS_FILE, RANKS_FILE_LOCK
from prefopt.core.slurm import job_attempt

FOLLOWER_WAIT_S = 900.0  # how long a torchrun host with node_rank > 0 waits for node_rank 0 to freeze the run dir


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

    @property
    def spans_ranks(self) -> bool:
        """Collectives have peers to talk to (otherwise every one returns its input)."""
        return self.initialized and self.world_size > 1

    @property
    def collective_device(self) -> torch.device:
        """Where a collective's tensors must live: NCCL takes only this rank's GPU, gloo only the CPU. Every
        tensor collective goes through here, so a CPU tensor never reaches NCCL (it would raise mid-run)."""
        if self.initialized and dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def gather_cat(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-rank 1-D tensor over ranks (equal sizes), so means are over the global batch."""
        if not self.spans_ranks:
            return values
        local = values.contiguous().to(self.collective_device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(values.device)

    def gather_objects(self, value) -> list:
        """Every rank's picklable `value`, in rank order (texts, tables: results that are not tensors)."""
        if not self.spans_ranks:
            return [value]
        parts = [None] * self.world_size
        dist.all_gather_object(parts, value)
        return parts

    def broadcast_objects(self, values: list) -> None:
        """Rank 0's picklable list `values`, in place on every rank (rank 0's view of a file decides for all)."""
        if self.spans_ranks:
            dist.broadcast_object_list(values, src=0)

    def sum(self, value: float) -> float:
        return self._reduce_float(value, dist.ReduceOp.SUM)

    def minimum(self, value: float) -> float:
        return self._reduce_float(value, dist.ReduceOp.MIN)

    def _reduce_float(self, value: float, op) -> float:
        if not self.spans_ranks:
            return value  # one rank: no tensor round trip in the step's metric reduction
        return float(self.all_reduce(torch.tensor([value], dtype=torch.float64), op))

    def all_reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """`values` reduced over ranks (a new tensor on values' device; values itself when there is one rank)."""
        if not self.spans_ranks:
            return values
        reduced = values.to(self.collective_device, copy=True)
        dist.all_reduce(reduced, op=op)
        return reduced.to(values.device)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07" (what `scontrol show hostnames` prints
    first)."""
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
    env["LOCAL_WORLD_SIZE"] = str(
        int(env["SLURM_NTASKS"]) // int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    )
    env["MASTER_ADDR"] = first_slurm_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1")
    env["MASTER_PORT"] = str(20_000 + int(env.get("SLURM_JOB_ID", "0")) % 40_000)


def export_ranks(hardware_cfg: DictConfig) -> None:
    """Inside an srun task RANK & co. come from SLURM (hardware.launcher=slurm, or `srun prefopt worker` with any
    config); elsewhere torchrun (or nobody: one process) set them. Idempotent: the worker calls it before training."""
    in_srun_task = "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ
    if in_srun_task and (hardware_cfg.launcher == "slurm" or "RANK" not in os.environ):
        export_slurm_ranks()


def interface_address(name: str) -> Optional[str]:
    """The IPv4 address of a network interface (ioctl SIOCGIFADDR), or None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            request = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(request[20:24])


def route_to(host: str) -> tuple[str, Optional[str]]:
    """(this host's address on the route to `host`, the interface holding it). A UDP connect only chooses the
    route: no packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(host), 9))
        local = probe.getsockname()[0]
    interface = next((name for _, name in socket.if_nameindex() if interface_address(name) == local), None)
    return local, interface


def bind_gloo_to_master_route() -> None:
    """gloo listens on the address its host name resolves to, which is often a loopback address (Debian's
    127.0.1.1, or a host without a name of its own): the other hosts could not reach it and the job would hang
    at its first collective. Bind it to the interface that routes to the master instead, unless
    GLOO_SOCKET_IFNAME says otherwise; a master on loopback (one host) changes nothing."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    try:
        local, interface = route_to(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    except OSError:
        return  # an unresolvable master fails in init_process_group with a clearer message
    if interface and not ipaddress.ip_address(local).is_loopback:
        os.environ["GLOO_SOCKET_IFNAME"] = interface


def launch_id() -> str:
    """Names one start of a run, the same in all of its ranks (a SLURM job attempt, or torchrun's master)."""
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ:
        return f"slurm job {job_attempt()}"
    if "MASTER_ADDR" in os.environ:
        return f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '')}"
    return f"local pid {os.getpid()}"


def record_rank(run_dir: Path, hardware_cfg: DictConfig) -> dict:
    """Add this rank's host (name, SLURM node, address and interface toward the master) to RUN_DIR/ranks.json, so
    every run shows where each rank ran: a multi-node job's ranks really spread over hosts, and a failure or
    a hang points at one. Ranks of an earlier start (a requeue, a resume) are replaced, not merged."""
    export_ranks(hardware_cfg)
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1"))
    address = interface = None
    if world_size > 1:
        try:
            address, interface = route_to(env.get("MASTER_ADDR", "127.0.0.1"))
        except OSError:
            pass
    entry = {
        "rank": int(env.get("RANK", "0")),
        "local_rank": int(env.get("LOCAL_RANK", "0")),
        "world_size": world_size,
        "host": host_name(),
        "slurm_node": env.get("SLURMD_NODENAME"),
        "address": address,
        "interface": env.get("GLOO_SOCKET_IFNAME") or interface,
        "pid": os.getpid(),
    }
    launch = launch_id()
    run_dir = Path(run_dir)
    with exclusive_lock(run_dir / RANKS_FILE_LOCK):  # every rank rewrites the one file
        try:
            recorded = json.loads((run_dir / RANKS_FILE).read_text())
        except (FileNotFoundError, ValueError):
            recorded = {}
        ranks = [
            rank
            for rank in recorded.get("ranks", [])
            if recorded.get("launch") == launch and rank["rank"] != entry["rank"]
        ]
        atomic_write_json(
            run_dir / RANKS_FILE, {"launch": launch, "ranks": sorted([*ranks, entry], key=lambda rank: rank["rank"])}
        )
    return entry


def is_follower_host(hardware_cfg: DictConfig) -> bool:
    """A torchrun host with node_rank > 0: node_rank 0 validates, freezes and locks the shared run dir."""
    return hardware_cfg.launcher == "torchrun" and hardware_cfg.nodes > 1 and hardware_cfg.node_rank > 0


def wait_for_frozen_config(run_dir: Path, timeout_s: float = FOLLOWER_WAIT_S) -> Path:
    """A follower host writes nothing to the run dir and takes no lock: it waits (bounded) for node_rank 0's
    config.yaml, then starts its ranks. They read config.yaml only once every host has met at the rendezvous,
    so they read this launch's file even where an earlier one was there (trainer.resume)."""
    deadline = time.monotonic() + timeout_s
    while not (Path(run_dir) / CONFIG_FILE).is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"node_rank 0 did not freeze {run_dir}/config.yaml within {timeout_s:.0f} s: start "
                "`prefopt train` with hardware.node_rank=0 (same overrides, same hydra.run.dir) on its host"
            )
        time.sleep(0.5)
    return Path(run_dir)


def torchrun_node_args(hardware_cfg: DictConfig) -> list[str]:
    """torchrun's rendezvous arguments: one host on a free local port, or hardware.nodes hosts meeting at
    hardware.rdzv_endpoint. Static rendezvous (--node_rank given, node_rank 0's agent hosts the store there),
    so global rank 0 always runs on node_rank 0, the host that owns the run dir."""
    if hardware_cfg.nodes == 1:
        return ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    host, _, port = str(hardware_cfg.rdzv_endpoint).rpartition(":")
    return [
        f"--nnodes={hardware_cfg.nodes}",
        f"--node_rank={hardware_cfg.node_rank}",
        f"--master_addr={host}",
        f"--master_port={port}",
    ]


def uses_deepspeed(hardware_cfg: DictConfig) -> bool:
    return hardware_cfg.engine == "deepspeed"


def init_distributed(hardware_cfg: DictConfig) -> DistInfo:
    """Join the process group when DeepSpeed or several ranks need one; a single torch process needs none."""
    export_ranks(hardware_cfg)
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
        if backend == "gloo":
            bind_gloo_to_master_route()
        for attempt in range(3):
            try:
                deepspeed.init_distributed(dist_backend=backend)
                break
            except RuntimeError as error:  # one rank on a port another process took since free_port() chose it
                if world_size != 1 or "address already in use" not in str(error).lower() or attempt == 2:
                    raise
                os.environ["MASTER_PORT"] = str(free_port())
    info.initialized = True
    return info


def leave_distributed() -> None:
    """After a run every rank finished: wait for the others, then tear gloo down in order. A rank that exits
    while its peer still has collective work in flight can abort in gloo's teardown ("terminate called without
    an active exception", SIGABRT), turning a finished run into a failed launch. A one-rank run keeps its group:
    it may be inline in a process that trains again (tests, sweeps), and DeepSpeed caches groups made from it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def device_for(hardware_cfg: DictConfig, info: DistInfo) -> torch.device:
    if hardware_cfg.device == "cuda":
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")
