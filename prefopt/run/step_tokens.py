"""How many positions the steps of a run hold, read from its tokenized pairs: what hardware=auto's estimate
(run/resources.py) scales activations, log-prob buffers and step time with.

Why: padding every pair to dataset.max_length made the estimate 13x too high for short data (an example's
~50-token UltraFeedback pairs were sized as 1,024-token ones, and the run was refused). Here the pairs are
tokenized as the worker will tokenize them (the same tokenizer and dataset settings, so the tokenized-pairs cache
of data/cache.py gets the entry the worker then reads, and nothing is tokenized twice; generated `arith` data has no
cache, regenerating it costs less than reading one), the sampler draws the micro batches the run will draw
(data/sampler.py, the run's seed, trainer.max_steps or its epochs), and each micro batch is sized in the layout
the run uses (data/layout.py BatchLayout.positions: packed rows or padded ones, padding included).

  memory: the largest micro batch the run will draw (the peak is the worst step's, and the run draws it);
  time:   the mean positions per optimizer step (grad_accum micro batches): the steps' total is the run's time.

Where the data cannot be read before launch (a model not downloaded yet, a hub dataset absent offline, a data
error the worker will name, dataset.cache_dir=null on data that would then be tokenized twice) the estimate
pads to dataset.max_length, as before, and says why.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

from omegaconf import DictConfig, OmegaConf

from prefopt.data import build_preference_data
from prefopt.data.layout import BatchLayout
from prefopt.data.sampler import training_sampler
from prefopt.model.loading import load_tokenizer, resolve_model_source
from prefopt.train.onpolicy import cached_onpolicy_samples
from prefopt.train.schedules import epoch_steps

MAX_SIMULATED_MICRO_BATCHES = 20_000  # a longer run draws from the same pairs: its largest batch is near these's


@dataclass(frozen=True)
class StepTokens:
    """The token counts the estimate uses, and the sentence that says where they come from."""

    micro_batch: int  # positions of the largest micro batch (padding included): activations
    scored: int  # response tokens of the largest micro batch (the head runs on these only): log-prob buffers
    per_step: float  # mean positions per optimizer step: FLOPs
    basis: str  # "from the data's lengths (...)" or "at dataset.max_length=N (...)"


def padded_to_max_length(cfg: DictConfig, reason: str) -> StepTokens:
    """Every sequence at dataset.max_length: an upper bound, for when the data is not read."""
    positions = 2 * cfg.trainer.micro_batch_size * cfg.dataset.max_length
    basis = f"at dataset.max_length={cfg.dataset.max_length} ({reason})"
    return StepTokens(positions, positions, positions * cfg.trainer.grad_accum, basis)


def from_pair_lengths(pair_lengths: list[tuple[int, int, int]], trainer_cfg: DictConfig, steps: int) -> StepTokens:
    """The micro batches PairSampler draws over `steps` optimizer steps (world size 1: each rank's micro batch has
    trainer.micro_batch_size pairs whatever the world size), sized by the run's layout."""
    layout = BatchLayout.from_trainer(trainer_cfg)
    pairs = [LengthsOnly(*(range(length) for length in lengths)) for lengths in pair_lengths]
    sampler = training_sampler(pairs, trainer_cfg, world_size=1)
    micro_batches = min(steps * trainer_cfg.grad_accum, MAX_SIMULATED_MICRO_BATCHES)
    largest, scored, total = 0, 0, 0
    for _ in range(micro_batches):
        batch = [pair_lengths[index] for index in sampler.next_indices(trainer_cfg.micro_batch_size)]
        positions = layout.positions(batch)
        largest, total = max(largest, positions), total + positions
        scored = max(scored, sum(chosen + rejected for _, chosen, rejected in batch))
    per_step = total / micro_batches * trainer_cfg.grad_accum
    basis = (
        f"from the data's lengths (largest micro batch {largest:,} tokens of {trainer_cfg.micro_batch_size} pairs, "
        f"{per_step:,.0f} per step on average, {trainer_cfg.batching})"
    )
    return StepTokens(largest, scored, per_step, basis)


class LengthsOnly(NamedTuple):
    """What the sampler reads of a pair (data/sampler.py pair_length): the lengths of its token ids."""

    prompt_ids: range
    chosen_ids: range
    rejected_ids: range


def step_tokens(cfg: DictConfig) -> StepTokens:
    """The run's token counts from its data, or at dataset.max_length with the reason it was not read."""
    try:
        nodes = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("model", "dataset")}
        lengths = training_pair_lengths(json.dumps({**nodes, "seed": cfg.trainer.seed}, sort_keys=True, default=str))
    except Exception as error:  # an interpolation that cannot resolve yet: validation names it
        lengths = f"the config does not resolve: {first_line(error)}"
    if isinstance(lengths, str):
        return padded_to_max_length(cfg, lengths)
    try:
        return from_pair_lengths(list(lengths), cfg.trainer, run_steps(cfg.trainer, len(lengths)))
    except Exception as error:  # impossible trainer values (max_steps=0, ...): validation names them
        return padded_to_max_length(cfg, f"the batches cannot be drawn: {first_line(error)}")


@functools.lru_cache(maxsize=32)
def training_pair_lengths(key: str) -> Union[tuple[tuple[int, int, int], ...], str]:
    """(prompt, chosen, rejected) lengths of the training pairs, or why they were not read. Per process and data
    config: the resolver (`--cfg job`, validation) and settling the choice read the data once."""
    settings = json.loads(key)
    cfg = OmegaConf.create({"model": settings["model"], "dataset": settings["dataset"]})
    reason = unread_reason(cfg)
    if reason:
        return reason
    try:
        # announce=False: the data's stats and warnings are the worker's to log, once, in the run's log
        tokenizer = load_tokenizer(cfg.model)
        # arith onpolicy: the cached samples; not cached yet, build_preference_data says so and max_length is counted
        samples = cached_onpolicy_samples(cfg.model, cfg.dataset, settings["seed"], tokenizer)
        data = build_preference_data(cfg.dataset, tokenizer, settings["seed"], announce=False, samples=samples)
    except Exception as error:  # the worker meets it again and names it; the estimate only needs lengths
        return f"the data was not read before launch: {first_line(error)}"
    return tuple((len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)) for pair in data.train)


def unread_reason(cfg: DictConfig) -> Optional[str]:
    """Why the data is not read before launch, or None when it is."""
    try:
        source = resolve_model_source(cfg.model)
    except Exception:  # the launch names it next, with the fix
        return f"model {cfg.model.name} is not here, nor its tokenizer"
    if source.kind == "hub":
        return "the model is not downloaded yet; the worker downloads it"
    if not cfg.dataset.get("cache_dir") and cfg.dataset.name != "arith":
        return "dataset.cache_dir=null: the data is tokenized once, by the worker"
    return None


def run_steps(trainer_cfg: DictConfig, num_pairs: int) -> int:
    if trainer_cfg.max_steps is not None:
        return int(trainer_cfg.max_steps)
    return epoch_steps(trainer_cfg.num_epochs, num_pairs, trainer_cfg.micro_batch_size, trainer_cfg.grad_accum, 1)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
