"""Which training pairs each micro batch draws: a seeded order per epoch, optionally grouped by length.

The order of epoch e is a pure function of (seed, e, the pairs' lengths, the global micro batch size), so
a sampler's position is two ints (epoch, offset into that epoch's order) and resume is exact: a sampler
rebuilt from its state() draws the same remaining batches, however the draws were split into calls.

group_by_length (trainer.group_by_length): the epoch's permutation is cut into mega-batches of
MEGA_BATCH_GROUPS global micro batches; inside each, pairs are sorted by length and cut into micro
batches, whose order is then shuffled (seeded). Pairs of a micro batch have similar lengths (less padding,
and packed rows of similar cost on every rank), while which pairs share a mega-batch stays random. The
trainer draws one global micro batch (micro_batch_size x ranks) per call across epoch boundaries, so
each epoch's groups are aligned to where its micro batches start: only the one micro batch that spans
an epoch boundary mixes lengths.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

MEGA_BATCH_GROUPS = 50  # global micro batches per mega-batch: sorting by length never reaches past one


def length_grouped(order: list[int], lengths: Sequence[int], group_size: int, generator: torch.Generator) -> list[int]:
    """`order` regrouped: within each mega-batch, runs of group_size pairs of similar length, in a shuffled order."""
    grouped: list[int] = []
    mega = group_size * MEGA_BATCH_GROUPS
    for start in range(0, len(order), mega):
        block = sorted(order[start : start + mega], key=lambda index: (-lengths[index], index))
        groups = [block[first : first + group_size] for first in range(0, len(block), group_size)]
        grouped += [
            index
            for position in torch.randperm(len(groups), generator=generator).tolist()
            for index in groups[position]
        ]
    return grouped


class PairSampler:
    """Epoch-wise permutations seeded by (seed, epoch); its position is two ints, so resume is exact.

    lengths (one per pair) and group_size (pairs per global micro batch) switch on length grouping."""

    def __init__(
        self,
        num_pairs: int,
        seed: int,
        epoch: int = 0,
        offset: int = 0,
        lengths: Optional[Sequence[int]] = None,
        group_size: int = 0,
    ):
        if lengths is not None and (len(lengths) != num_pairs or group_size < 1):
            raise ValueError(
                f"length grouping needs one length per pair ({len(lengths)} for {num_pairs}) and group_size >= 1 (got "
                f"{group_size})"
            )
        self.num_pairs, self.seed, self.epoch, self.offset = num_pairs, seed, epoch, offset
        self.lengths, self.group_size = lengths, group_size

    def _order(self) -> list[int]:
        """This epoch's order, drawn once per epoch (not once per micro batch)."""
        if getattr(self, "_order_epoch", None) != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_pairs, generator=generator).tolist()
            if self.lengths is not None:
                # the first `phase` pairs complete the micro batch the previous epoch's last pairs started
                phase = (-self.epoch * self.num_pairs) % self.group_size
                order = order[:phase] + length_grouped(order[phase:], self.lengths, self.group_size, generator)
            self._cached_order, self._order_epoch = order, self.epoch
        return self._cached_order

    def next_indices(self, count: int) -> list[int]:
        indices: list[int] = []
        while len(indices) < count:
            order = self._order()
            take = order[self.offset : self.offset + count - len(indices)]
            indices += take
            self.offset += len(take)
            if self.offset >= self.num_pairs:
                self.epoch, self.offset = self.epoch + 1, 0
        return indices

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


def pair_length(pair) -> int:
    """Tokens one pair costs in the packed layout: its prompt once and both responses."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def training_sampler(pairs: list, trainer_cfg, world_size: int, state: Optional[dict] = None) -> PairSampler:
    """The run's sampler from its config (trainer.seed, trainer.group_by_length) and, on resume, its saved state."""
    grouping = {}
    if trainer_cfg.group_by_length:
        grouping = {
            "lengths": [pair_length(pair) for pair in pairs],
            "group_size": trainer_cfg.micro_batch_size * world_size,
        }
    return PairSampler(len(pairs), trainer_cfg.seed, **(state or {}), **grouping)
