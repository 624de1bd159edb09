"""Pair inspection: what a preference pair looks like to the model before training, per pair, for `prefopt inspect`
and for `dataset.filter` (training on the pairs an inspected column selects).

Likelihood displacement (the chosen log-prob falling under DPO) is driven by pairs whose chosen and rejected
responses have similar hidden representations (Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement
in Direct Preference Optimization", arXiv:2410.08847). Their CHES score, with S+ and S- the sums of the last layer's
hidden states at the positions that emit each response token (the states the output head reads, after the final
norm):

    ches      = <S+, S-> - ||S+||^2
    ches_norm = <S+ / |y+|, S- / |y-|> - ||S+ / |y+|||^2          (the length-normalized form, with means)

High CHES = the rejected response's gradient direction overlaps the chosen's, so pushing it down drags the chosen
down too. Beside it, per pair: token counts, the reference log-probs (sum and per-token mean: the model before
training is the reference), the token overlap of the two responses, and the gate (losses/gate.py) each kind in
`inspect.gates` would give the pair at step 0.

One forward per batch of pairs (the run's layout: packed or padded give the same numbers), split across ranks like
eval (sharding.py); the values are cached like the reference pass, keyed by the pairs, the model's identity and
weights, and what is computed.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from prefopt.core.distributed import DistInfo
from prefopt.core.errors import ConfigError
from prefopt.data import PreferenceData, TokenizedPair
from prefopt.data.layout import BatchLayout, pair_groups
from prefopt.losses import GateParams, per_example_gates
from prefopt.losses.gate import GATE_KINDS, apply_gate
from prefopt.model.logps import sequence_logps, split_pairs
from prefopt.train.reference import load_cache, save_cache
from prefopt.train.sharding import pair_scored_tokens, sharded_pass

log = logging.getLogger("prefopt")

INSPECTION_VERSION = 1
# the columns every inspection has, in table order; then gate_<kind> for each kind in inspect.gates
BASE_COLUMNS = (
    "prompt_tokens",  # prompt length in tokens
    "chosen_tokens",  # chosen response length in tokens
    "rejected_tokens",  # rejected response length in tokens
    "ref_chosen_logps",  # summed log-prob of the chosen response under the model (the reference at step 0)
    "ref_rejected_logps",  # the same for the rejected response
    "ref_chosen_mean",  # per-token mean log-prob of the chosen response
    "ref_rejected_mean",  # per-token mean log-prob of the rejected response
    "ref_margin",  # ref_chosen_logps - ref_rejected_logps
    "token_overlap",  # shared tokens of the two responses (multiset intersection) over the longer one's length
    "shared_prefix",  # leading tokens the two responses have in common
    "ches",  # <S+, S-> - ||S+||^2 (Razin et al. 2024)
    "ches_norm",  # the same with mean hidden states: comparable across lengths
)


def gate_column(kind: str) -> str:
    return f"gate_{kind}"


def inspection_columns(gate_kinds: list[str]) -> list[str]:
    return [*BASE_COLUMNS, *(gate_column(kind) for kind in gate_kinds)]


def inspected_gates(cfg: DictConfig) -> list[GateParams]:
    """One gate per kind in inspect.gates, with the loss's gate settings (alpha, tau, quantile, kappa) where the loss
    has a gate block, else the gate's defaults: what that kind would give each pair at step 0."""
    settings: dict[str, Any] = {}
    if "gate" in cfg.loss and cfg.loss.gate is not None:
        settings = {
            key: value for key, value in OmegaConf.to_container(cfg.loss.gate, resolve=True).items() if key != "kind"
        }
    gates = []
    for kind in cfg.inspect.gates:  # checked by check_inspection_config
        gates.append(GateParams.from_config({**settings, "kind": kind}, key_prefix="inspect.gates.", owner="the gate"))
    return gates


def text_columns(pair: TokenizedPair) -> list[float]:
    """The columns read from the token ids alone."""
    chosen, rejected = pair.chosen_ids, pair.rejected_ids
    shared = sum((Counter(chosen) & Counter(rejected)).values())
    prefix = 0
    for chosen_id, rejected_id in zip(chosen, rejected):
        if chosen_id != rejected_id:
            break
        prefix += 1
    return [len(pair.prompt_ids), len(chosen), len(rejected), shared / max(len(chosen), len(rejected), 1), prefix]


def ches_scores(chosen_sums: torch.Tensor, rejected_sums: torch.Tensor) -> torch.Tensor:
    """(B,) CHES from (B, H) summed hidden states: <S+, S-> - ||S+||^2 (float64)."""
    return (chosen_sums * rejected_sums).sum(-1) - (chosen_sums * chosen_sums).sum(-1)


@torch.no_grad()
def score_pairs(
    model,
    pairs: list[TokenizedPair],
    layout: BatchLayout,
    gates: list[GateParams],
    chunk_size: int,
    device,
    pad_id: int,
    min_scored_tokens: int = 0,
) -> torch.Tensor:
    """(len(pairs), len(BASE_COLUMNS) + len(gates)) float64: every inspected column of these pairs, one forward
    (min_scored_tokens: see sequence_logps)."""
    batch = layout.build(pair_groups(pairs), pad_id).to(device)
    token = sequence_logps(model, batch, chunk_size, with_hidden_sums=True, min_scored_tokens=min_scored_tokens)
    chosen_logps, rejected_logps = (value.double() for value in split_pairs(token.summed))
    chosen_lengths, rejected_lengths = (value.double().clamp(min=1) for value in split_pairs(token.lengths))
    _, rejected_tokens = split_pairs(token.logps)
    _, rejected_mask = split_pairs(token.mask)
    chosen_sums, rejected_sums = split_pairs(token.hidden_sums)
    ches = ches_scores(chosen_sums, rejected_sums)
    ches_norm = ches_scores(chosen_sums / chosen_lengths[:, None], rejected_sums / rejected_lengths[:, None])
    gate_values = []
    for gate in gates:
        _, values = apply_gate(gate, rejected_logps, rejected_lengths, rejected_tokens.double(), rejected_mask)
        gate_values.append(per_example_gates(gate, values, rejected_mask).double())
    text = torch.tensor([text_columns(pair) for pair in pairs], dtype=torch.float64, device=chosen_logps.device)
    model_columns = [
        chosen_logps,
        rejected_logps,
        chosen_logps / chosen_lengths,
        rejected_logps / rejected_lengths,
        chosen_logps - rejected_logps,
    ]
    return torch.cat(
        [text[:, :3], torch.stack(model_columns, 1), text[:, 3:], torch.stack([ches, ches_norm, *gate_values], 1)], 1
    )


def inspection_key(pairs: list[TokenizedPair], identity: str, fingerprint: str, gates: list[GateParams]) -> str:
    """What the values depend on: the pairs' token ids, the model (identity and weights) and the gates computed."""
    digest = hashlib.sha256(f"inspect-v{INSPECTION_VERSION}|{identity}|{fingerprint}|{gates!r}".encode())
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes() + b"|")
    return digest.hexdigest()[:24]


@dataclass
class Inspection:
    """Inspected columns of a list of pairs, in the pairs' order."""

    columns: list[str]
    values: torch.Tensor  # (pairs, columns) float64
    cache: str  # hit | miss

    def column(self, name: str) -> torch.Tensor:
        if name not in self.columns:
            raise ConfigError(f"{name!r} is not an inspected column; choose one of: {', '.join(self.columns)}")
        return self.values[:, self.columns.index(name)]


def inspect_pairs(
    model,
    pairs: list[TokenizedPair],
    cfg: DictConfig,
    identity: Optional[str],
    fingerprint: Optional[str],
    dist: DistInfo,
    device,
    pad_id: int,
) -> Inspection:
    """Every inspected column of `pairs` (each rank scores a shard; every rank gets all). With the model's identity
    and weights' fingerprint (the base model), from the cache in inspect.cache_dir when it holds them for this model,
    data and gates, else computed and cached; without (a trained policy), computed and not cached."""
    gates = inspected_gates(cfg)
    columns = inspection_columns([gate.kind for gate in gates])
    cached = identity is not None and fingerprint is not None and bool(pairs)
    if cached:
        key = inspection_key(pairs, identity, fingerprint, gates)
        path = Path(cfg.inspect.cache_dir).expanduser() / f"{key}.pt"
        values = load_cache(path, key, (len(pairs), len(columns)))
        if dist.sum(float(values is not None)) == dist.world_size:
            log.info("inspection cache hit: %s", path)
            return Inspection(columns, values, "hit")
    layout = BatchLayout.from_trainer(cfg.trainer)
    was_training = model.training
    model.eval()
    try:
        values = sharded_pass(
            len(pairs),
            cfg.trainer.eval_batch_size,
            dist,
            lambda indices, peer_tokens: score_pairs(
                model,
                [pairs[i] for i in indices],
                layout,
                gates,
                cfg.trainer.logp_chunk_size,
                device,
                pad_id,
                peer_tokens,
            ),
            lambda index: pair_scored_tokens(pairs[index]),
        )
    finally:
        model.train(was_training)
    if not pairs:
        values = torch.zeros(0, len(columns), dtype=torch.float64)
    if cached:
        if dist.is_main:
            save_cache(path, key, values, "inspect.cache_dir")
        dist.barrier()
    return Inspection(columns, values, "miss" if cached else "off")


def filter_training_pairs(data: PreferenceData, cfg_filter: DictConfig, inspection: Inspection) -> str:
    """In place: data.train keeps the pairs dataset.filter selects (in order), and data.stats records the cut and what
    was dropped (data/* in the run's metrics). Returns the line that says so."""
    values = inspection.column(cfg_filter.column)
    if cfg_filter.threshold is not None:
        cut, how = float(cfg_filter.threshold), f"threshold {float(cfg_filter.threshold):g}"
    else:
        cut = float(torch.quantile(values, float(cfg_filter.quantile)))
        how = f"quantile {float(cfg_filter.quantile):g} = {cut:.4g}"
    keep = values <= cut if cfg_filter.drop == "above" else values >= cut
    kept = [data.train[index] for index in keep.nonzero().flatten().tolist()]
    if not kept:
        raise ConfigError(
            f"dataset.filter ({cfg_filter.column}, {how}, drop={cfg_filter.drop}) keeps none of the {len(data.train)} "
            "training pairs; move the cut"
        )
    total = len(data.train)
    data.train = kept
    data.stats |= {"train/pairs": len(kept), "train/filter_dropped": total - len(kept), "train/filter_cut": cut}
    return (
        f"dataset.filter: dropped the {total - len(kept)} of {total} training pairs whose {cfg_filter.column} is "
        f"{cfg_filter.drop} the cut ({how}); {len(kept)} kept"
    )


def filter_enabled(dataset_cfg: DictConfig) -> bool:
    """dataset.filter names a column (null = every pair is kept)."""
    return OmegaConf.select(dataset_cfg, "filter.column") is not None


def check_inspection_config(cfg: DictConfig) -> None:
    """inspect.* and dataset.filter values that cannot work, named (the parent runs this before any model loads)."""
    for kind in cfg.inspect.gates:
        if kind not in GATE_KINDS or kind == "none":
            kinds = ", ".join(k for k in GATE_KINDS if k != "none")
            raise ConfigError(f"inspect.gates: {kind!r} is not a gate kind; list some of: {kinds}")
    spec = cfg.dataset.filter
    if spec.column is None:
        if spec.quantile is not None or spec.threshold is not None:
            raise ConfigError(
                "dataset.filter.quantile / threshold is set but dataset.filter.column is null; name the column, e.g. "
                "dataset.filter.column=ches_norm"
            )
        return
    columns = inspection_columns(list(cfg.inspect.gates))
    if spec.column not in columns:
        raise ConfigError(
            f"dataset.filter.column={spec.column} is not an inspected column; choose one of: {', '.join(columns)} "
            "(a gate_<kind> column needs the kind in inspect.gates)"
        )
    if (spec.quantile is None) == (spec.threshold is None):
        raise ConfigError(
            "dataset.filter needs exactly one of dataset.filter.quantile (e.g. 0.9 with drop=above drops the top 10%) "
            "and dataset.filter.threshold"
        )
    if spec.quantile is not None and not 0.0 <= spec.quantile <= 1.0:
        raise ConfigError(
            f"dataset.filter.quantile={spec.quantile} must be in [0, 1] (1 with drop=above keeps every pair: the "
            "baseline of a sweep over the cut)"
        )
    if cfg.trainer.num_epochs is not None:
        raise ConfigError(
            "dataset.filter with trainer.num_epochs: the number of pairs kept is known only once the model is loaded, "
            "so the run's length cannot be settled before; give trainer.max_steps (and trainer.num_epochs=null)"
        )
