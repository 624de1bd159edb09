"""Passes over a fixed list of items (eval pairs, probe prompts, reference pairs, greedy prompts) split
across ranks: each rank scores a disjoint shard, and one collective at the end gives every rank every
result, in the items' order, equal to what one rank alone computes.

Rank r takes items r, r + W, r + 2W, ... (W ranks) in batches. Under ZeRO-3 a forward gathers the
partitioned parameters collectively, module by module, so every rank must run the same forwards: a rank
with fewer batches than rank 0 repeats one (a *padding* batch, scored and discarded), and each batch
knows the largest number of scored tokens any rank has in the same batch position, so the output head
(called once per log-prob chunk, logps.py) is called equally often on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from prefopt.core.distributed import DistInfo
from prefopt.observe.console import report_progress


@dataclass
class ShardPlan:
    batches: list[list[list[int]]]  # [rank][position] -> item indices; every rank has the same number of positions
    owned: list[int]  # per rank: how many leading batches are its own items (the rest are padding, discarded)

    def peer_batches(self, position: int) -> list[list[int]]:
        """The batch every rank scores at this position (padding included)."""
        return [batches[position] for batches in self.batches]


def pair_scored_tokens(pair) -> int:
    """Response tokens a preference pair scores (chosen + rejected), in any layout."""
    return len(pair.chosen_ids) + len(pair.rejected_ids)


def largest_batch_tokens(batches: list[list[int]], item_tokens: Callable[[int], int]) -> int:
    """The most scored tokens any rank's batch holds, when rank r scores batches[r]: what each rank passes as
    sequence_logps(min_scored_tokens=...) so that all of them call the output head equally often."""
    return max(sum(item_tokens(index) for index in batch) for batch in batches)


def shard_plan(count: int, batch_size: int, world_size: int) -> ShardPlan:
    """Strided shards of `count` items in batches of `batch_size`, padded to rank 0's number of batches
    (rank 0's shard is the longest). A padding batch repeats the rank's last batch, or the first items
    when its shard is empty (fewer items than ranks)."""
    if count < 1 or batch_size < 1 or world_size < 1:
        raise ValueError(
            f"shard_plan needs count, batch_size and world_size >= 1 (got {count}, {batch_size}, {world_size})"
        )
    shards = [list(range(rank, count, world_size)) for rank in range(world_size)]
    positions = -(-len(shards[0]) // batch_size)
    batches, owned = [], []
    for shard in shards:
        own = [shard[start : start + batch_size] for start in range(0, len(shard), batch_size)]
        filler = own[-1] if own else list(range(min(batch_size, count)))
        batches.append(own + [filler] * (positions - len(own)))
        owned.append(len(own))
    return ShardPlan(batches, owned)


def sharded_pass(
    count: int,
    batch_size: int,
    dist: DistInfo,
    score: Callable[[list[int], int], torch.Tensor],
    item_tokens: Optional[Callable[[int], int]] = None,
) -> torch.Tensor:
    """Every item's result row, (count, K) float64, the same on every rank; one all_gather in all.

    score(indices, peer_scored_tokens) returns a (len(indices), K) tensor for those items; it runs once per
    batch position on every rank. peer_scored_tokens is the largest total of item_tokens over the batches
    all ranks score at that position (0 without item_tokens): pass it to sequence_logps(min_scored_tokens=...)."""
    if count == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    plan = shard_plan(count, batch_size, dist.world_size)
    rows, result = [], None
    for position, indices in enumerate(plan.batches[dist.rank]):
        peer_tokens = largest_batch_tokens(plan.peer_batches(position), item_tokens) if item_tokens else 0
        result = score(indices, peer_tokens).detach().to(torch.float64).cpu()
        if result.dim() != 2 or result.shape[0] != len(indices):
            raise ValueError(
                f"score returned shape {tuple(result.shape)} for {len(indices)} items; expected ({len(indices)}, K)"
            )
        if position < plan.owned[dist.rank]:
            rows.append(result)
        report_progress(position + 1, len(plan.batches[dist.rank]))
    width = result.shape[1]
    longest = len(range(0, count, dist.world_size))  # rank 0's shard
    local = torch.zeros(longest, width, dtype=torch.float64)
    if rows:
        mine = torch.cat(rows)
        local[: mine.shape[0]] = mine
    gathered = dist.gather_cat(local.flatten()).view(dist.world_size, longest, width)
    values = torch.empty(count, width, dtype=torch.float64)
    for rank in range(dist.world_size):
        owned = len(range(rank, count, dist.world_size))
        values[rank :: dist.world_size] = gathered[rank, :owned]
    return values


def sharded_objects(count: int, batch_size: int, dist: DistInfo, produce: Callable[[list[int]], list]) -> list:
    """Like sharded_pass for Python results (generated texts): produce(indices) -> one object per item,
    called on every rank once per batch position (padding included); one all_gather_object in all."""
    if count == 0:
        return []
    plan = shard_plan(count, batch_size, dist.world_size)
    mine: list = []
    for position, indices in enumerate(plan.batches[dist.rank]):
        produced = produce(indices)
        if position < plan.owned[dist.rank]:
            mine += list(zip(indices, produced))
        report_progress(position + 1, len(plan.batches[dist.rank]))
    ordered = [None] * count
    for index, value in (pair for part in dist.gather_objects(mine) for pair in part):
        ordered[index] = value
    return ordered
