"""DistInfo's collectives: every tensor one hands to torch.distributed sits where the backend takes it
(NCCL: this rank's GPU; gloo: the CPU), the values come back on the caller's device, and the results
are right over two real gloo ranks, which then leave their group in order. No module but
prefopt/core/distributed.py calls a tensor collective."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from prefopt.core.distributed import DistInfo, free_port, leave_distributed

REPO = Path(__file__).resolve().parents[1]


def test_collectives_use_the_rank_gpu_under_nccl_and_the_cpu_under_gloo(monkeypatch):
    info = DistInfo(rank=3, local_rank=1, world_size=4, initialized=True)
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch_dist, "get_backend", lambda *args: "nccl")
    assert info.collective_device == torch.device("cuda", 1)
    monkeypatch.setattr(torch_dist, "get_backend", lambda *args: "gloo")
    assert info.collective_device == torch.device("cpu")
    assert DistInfo().collective_device == torch.device("cpu")  # one process, no group


class Handed(Exception):
    """Raised by the stand-in collective once it has seen the tensor it was handed."""


@pytest.mark.parametrize("call", ["sum", "minimum", "all_reduce", "gather_cat"])
def test_every_tensor_collective_is_handed_a_tensor_on_the_collective_device(monkeypatch, call):
    """What would have reached NCCL as a CPU tensor (and raised mid-run) before: meta stands in for the GPU."""
    seen = []

    def collective(tensor_or_list, *args, **kwargs):
        seen.append(tensor_or_list[0].device if isinstance(tensor_or_list, list) else tensor_or_list.device)
        raise Handed

    monkeypatch.setattr(DistInfo, "collective_device", property(lambda self: torch.device("meta")))
    monkeypatch.setattr(torch_dist, "all_reduce", collective)
    monkeypatch.setattr(torch_dist, "all_gather", collective)
    info = DistInfo(rank=0, world_size=2, initialized=True)
    with pytest.raises(Handed):
        {
            "sum": lambda: info.sum(1.0),
            "minimum": lambda: info.minimum(1.0),
            "all_reduce": lambda: info.all_reduce(torch.ones(2)),
            "gather_cat": lambda: info.gather_cat(torch.ones(2)),
        }[call]()
    assert seen == [torch.device("meta")]


def test_no_module_outside_distributed_py_calls_a_tensor_collective():
    collective = re.compile(r"\b(all_reduce|all_gather|all_gather_into_tensor|reduce_scatter|broadcast)\(")
    offenders = []
    for path in (REPO / "prefopt").rglob("*.py"):
        text = path.read_text()
        if path.name == "distributed.py" or "import torch.distributed" not in text:
            continue  # elsewhere `dist` is a DistInfo, whose methods place the tensors
        offenders += [
            f"{path.relative_to(REPO)}:{number}"
            for number, line in enumerate(text.splitlines(), 1)
            if collective.search(line)
        ]
    assert not offenders, (
        f"route these through DistInfo (prefopt/core/distributed.py) so NCCL gets GPU tensors: {offenders}"
    )


def _two_rank_collectives(rank: int, port: int, results) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        info = DistInfo(rank=rank, local_rank=rank, world_size=2, initialized=True)
        gathered = info.gather_cat(torch.tensor([rank + 1.0, rank + 10.0]))
        reduced = info.all_reduce(torch.tensor([rank + 1.0], dtype=torch.float64))
        values = (
            info.sum(rank + 0.5),
            info.minimum(rank + 0.5),
            gathered.tolist(),
            reduced.tolist(),
            str(gathered.device),
            info.gather_objects(f"r{rank}"),
        )
        if rank == 1:
            time.sleep(1.0)  # rank 0 reaches the teardown first: it must wait for its peer, not exit under it
        leave_distributed()
        results[rank] = (*values, torch_dist.is_initialized())
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def test_collectives_over_two_real_gloo_ranks():
    results = mp.Manager().dict()
    mp.spawn(_two_rank_collectives, args=(free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        total, smallest, gathered, reduced, device, objects, still_in_group = results[rank]
        assert total == 2.0 and smallest == 0.5
        assert gathered == [1.0, 10.0, 2.0, 11.0] and device == "cpu"
        assert reduced == [3.0]
        assert objects == ["r0", "r1"]
        assert not still_in_group  # a finished multi-rank run leaves its group in order (gloo aborts a peer otherwise)


def test_a_one_rank_group_is_kept_after_a_run(monkeypatch):
    """An inline one-rank run may train again in the same process (tests, sweeps): DeepSpeed caches groups made
    from the default group, so tearing it down would break the next run."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    started_here = not torch_dist.is_initialized()
    if started_here:
        torch_dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        leave_distributed()
        assert torch_dist.is_initialized()
    finally:
        if started_here:
            torch_dist.destroy_process_group()
