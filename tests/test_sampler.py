"""The training sampler (prefopt/data/sampler.py): the plain seeded order, and trainer.group_by_length: pairs of
similar length share a micro batch, every epoch still visits every pair once, the order is reproducible from
the seed, and a sampler rebuilt from its state (resume) draws exactly the remaining batches."""

from __future__ import annotations

import random

import pytest
import torch

from prefopt.data.sampler import MEGA_BATCH_GROUPS, PairSampler
from prefopt.observe.tracking import read_jsonl
from tests.helpers import run_train

NUM_PAIRS, GROUP = 203, 4  # not a multiple of the group: micro batches straddle epoch boundaries


def lengths_for(count: int, seed: int = 5) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10, 400) for _ in range(count)]


def draws(sampler: PairSampler, batches: int, group: int = GROUP) -> list[list[int]]:
    return [sampler.next_indices(group) for _ in range(batches)]


def mean_spread(batches: list[list[int]], lengths: list[int]) -> float:
    return sum(max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in batches) / len(batches)


def test_the_plain_order_is_the_seeded_permutation():
    generator = torch.Generator().manual_seed(3 * 100_003 + 0)
    assert PairSampler(10, seed=3).next_indices(10) == torch.randperm(10, generator=generator).tolist()


def test_grouped_batches_have_similar_lengths_and_each_epoch_visits_every_pair_once():
    lengths = lengths_for(NUM_PAIRS)
    epochs = 3
    grouped = PairSampler(NUM_PAIRS, seed=1, lengths=lengths, group_size=GROUP)
    stream = [index for batch in draws(grouped, NUM_PAIRS * epochs // GROUP) for index in batch]
    for epoch in range(epochs - 1):
        assert sorted(stream[epoch * NUM_PAIRS : (epoch + 1) * NUM_PAIRS]) == list(range(NUM_PAIRS))
    grouped_batches = draws(
        PairSampler(NUM_PAIRS, seed=1, lengths=lengths, group_size=GROUP), NUM_PAIRS * epochs // GROUP
    )
    plain_batches = draws(PairSampler(NUM_PAIRS, seed=1), NUM_PAIRS * epochs // GROUP)
    # lengths 10..400 uniformly: random batches of 4 spread ~230 tokens, grouped ones (200-pair mega-batches) a few
    assert mean_spread(grouped_batches, lengths) < mean_spread(plain_batches, lengths) / 5
    # groups stay aligned to the micro batches after an epoch boundary: at most one mixed batch per boundary
    boundary_batches = {epoch * NUM_PAIRS // GROUP for epoch in range(1, epochs)}
    wide = [
        b
        for b, batch in enumerate(grouped_batches)
        if max(lengths[i] for i in batch) - min(lengths[i] for i in batch) > 60
    ]
    assert set(wide) <= boundary_batches


def test_grouping_is_reproducible_from_the_seed_and_shuffles_the_micro_batches():
    lengths = lengths_for(NUM_PAIRS)
    first = draws(PairSampler(NUM_PAIRS, seed=7, lengths=lengths, group_size=GROUP), 60)
    again = draws(PairSampler(NUM_PAIRS, seed=7, lengths=lengths, group_size=GROUP), 60)
    other = draws(PairSampler(NUM_PAIRS, seed=8, lengths=lengths, group_size=GROUP), 60)
    assert first == again and first != other
    # the micro batches of a mega-batch come in a shuffled order, not longest first
    batch_lengths = [max(lengths[i] for i in batch) for batch in first[:MEGA_BATCH_GROUPS]]
    assert batch_lengths != sorted(batch_lengths, reverse=True) and batch_lengths != sorted(batch_lengths)


@pytest.mark.parametrize("stop_after", [1, 50, 51, 120])  # mid-epoch, on and just after an epoch boundary
def test_a_sampler_rebuilt_from_its_state_draws_the_same_remaining_batches(stop_after):
    lengths = lengths_for(NUM_PAIRS)
    straight = draws(PairSampler(NUM_PAIRS, seed=2, lengths=lengths, group_size=GROUP), 200)
    interrupted = PairSampler(NUM_PAIRS, seed=2, lengths=lengths, group_size=GROUP)
    before = draws(interrupted, stop_after)
    resumed = PairSampler(NUM_PAIRS, seed=2, **interrupted.state(), lengths=lengths, group_size=GROUP)
    assert before + draws(resumed, 200 - stop_after) == straight


def test_the_order_does_not_depend_on_how_draws_are_split():
    """training_reference_pairs draws a whole run's pairs in one call; training draws them one micro batch at a time."""
    lengths = lengths_for(NUM_PAIRS)
    one_call = PairSampler(NUM_PAIRS, seed=4, lengths=lengths, group_size=GROUP).next_indices(GROUP * 120)
    assert one_call == [
        index
        for batch in draws(PairSampler(NUM_PAIRS, seed=4, lengths=lengths, group_size=GROUP), 120)
        for index in batch
    ]


def test_length_grouping_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="one length per pair"):
        PairSampler(5, seed=0, lengths=[1, 2, 3], group_size=2)


TINY = [
    "model=tiny_llama",
    "hardware=cpu",
    "trainer.eval_batch_size=4",
    "trainer.lr=1e-3",
    "dataset.arith.num_train=24",
    "dataset.arith.num_eval=4",
    "trainer.greedy_eval_examples=0",
    "dynamics.enabled=false",
    "trainer.warmup_steps=0",
    "trainer.micro_batch_size=4",
    "logger.wandb.mode=disabled",
    "trainer.max_steps=8",
    "trainer.eval_every=0",
    "trainer.group_by_length=true",
]


def test_group_by_length_training_resumes_exactly(tmp_path):
    """End to end: the precomputed reference covers the grouped order's pairs, and a run stopped mid-way (after
    an epoch boundary: 24 pairs = 6 steps) and resumed logs the straight run's losses."""
    straight = run_train(tmp_path / "straight", *TINY, f"reference.cache_dir={tmp_path / 'cache'}")
    stopped = tmp_path / "stopped"
    run_train(
        stopped, *TINY, f"reference.cache_dir={tmp_path / 'cache'}", "trainer.save_every=1", "trainer.stop_after=7"
    )
    run_train(
        stopped, *TINY, f"reference.cache_dir={tmp_path / 'cache'}", "trainer.save_every=1", "trainer.resume=true"
    )
    losses = {
        run: {row["step"]: row["train/loss"] for row in read_jsonl(run / "metrics.jsonl") if "train/loss" in row}
        for run in (straight, stopped)
    }
    assert sorted(losses[stopped]) == list(range(1, 9))
    for step in range(1, 9):
        assert losses[stopped][step] == pytest.approx(losses[straight][step], rel=1e-6, abs=1e-7), step
