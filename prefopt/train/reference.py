"""The reference model's log-probs, from one of three places:

- a frozen copy of the initial policy (under DeepSpeed, an inference engine; ZeRO-3 when the policy is);
- the policy itself with its LoRA adapters disabled (no second copy in memory);
- a precomputed cache (`reference.precompute=true`): one distributed pass before training computes the
  summed reference log-prob of every train and eval pair, stored under a key that hashes the token ids
  (data content + tokenization settings) and the reference's identity and weights. Every job of a sweep
  over loss / beta / gate shares it, and training then holds no reference at all.

Four sums per pair are kept (REFERENCE_COLUMNS): each response's whole log-prob, and its sum over the pair's
shared length min(|y_w|, |y_l|), which LD-DPO (losses/reweight.py) weights apart from the rest. Losses that
average divide by the lengths themselves, and the gate reads the policy's per-token log-probs, never the
reference's.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from prefopt.core.distributed import DistInfo
from prefopt.core.fileutil import atomic_write_bytes, exclusive_lock, file_digests
from prefopt.data import PreferenceData, TokenizedPair
from prefopt.data.layout import BatchLayout, SequenceBatch, pair_groups
from prefopt.data.sampler import training_sampler
from prefopt.losses.reweight import shared_lengths, shared_sums
from prefopt.model.loading import freeze, weight_files
from prefopt.model.logps import TokenLogps, sequence_logps, split_pairs
from prefopt.train.engine import wrap_reference
from prefopt.train.sharding import pair_scored_tokens, sharded_pass

log = logging.getLogger("prefopt")

CACHE_VERSION = 2  # 2: four columns per pair (REFERENCE_COLUMNS)
REFERENCE_COLUMNS = ("chosen", "rejected", "chosen_shared", "rejected_shared")
ReferenceValues = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (B,) each, REFERENCE_COLUMNS


def reference_values(token_logps: TokenLogps) -> ReferenceValues:
    """A batch of pairs' REFERENCE_COLUMNS from its 2B sequences' token log-probs (chosen rows, then rejected)."""
    chosen_tokens, rejected_tokens = split_pairs(token_logps.logps)
    chosen_mask, rejected_mask = split_pairs(token_logps.mask)
    shared = shared_lengths(chosen_mask, rejected_mask)
    return (
        chosen_tokens.sum(-1),
        rejected_tokens.sum(-1),
        shared_sums(chosen_tokens, chosen_mask, shared),
        shared_sums(rejected_tokens, rejected_mask, shared),
    )


class ModelReference:
    """A frozen model (a copy of the initial policy, or the policy with adapters disabled)."""

    def __init__(self, model, chunk_size: int, adapters_off: bool = False):
        self.model, self.chunk_size, self.adapters_off = model, chunk_size, adapters_off

    @torch.no_grad()
    def logps(self, pairs: list[TokenizedPair], batch: SequenceBatch, min_scored_tokens: int = 0) -> ReferenceValues:
        """min_scored_tokens: see sequence_logps (a frozen ZeRO-3 reference gathers its head per call too)."""
        if self.adapters_off:
            with self.model.disable_adapter():
                return reference_values(
                    sequence_logps(self.model, batch, self.chunk_size, min_scored_tokens=min_scored_tokens)
                )
        return reference_values(sequence_logps(self.model, batch, self.chunk_size, min_scored_tokens=min_scored_tokens))


def pair_key(pair: TokenizedPair) -> tuple:
    return (tuple(pair.prompt_ids), tuple(pair.chosen_ids), tuple(pair.rejected_ids))


class CachedReference:
    def __init__(self, table: dict[tuple, tuple[float, ...]], device: torch.device):
        self.table, self.device = table, device  # pair key -> its REFERENCE_COLUMNS

    def logps(self, pairs: list[TokenizedPair], batch: SequenceBatch, min_scored_tokens: int = 0) -> ReferenceValues:
        values = torch.tensor([self.table[pair_key(pair)] for pair in pairs], dtype=torch.float32, device=self.device)
        return tuple(values.unbind(dim=1))


def weights_fingerprint(model) -> str:
    """A hash of every parameter's bytes (and names, dtypes): the fallback for weights that exist only in memory."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reference_fingerprint(
    model, model_cfg: DictConfig, weight_paths: Optional[list[Path]], seed: int, dist: DistInfo
) -> str:
    """What identifies the reference's weights, computed on rank 0 only and broadcast: the weight files'
    digests (memoized), the seed for a random tiny model, or (weights only in memory) their bytes."""
    fingerprint = [None]
    if dist.is_main:
        if model_cfg.source == "tiny":
            fingerprint[0] = f"tiny-seed{seed}"  # identity holds the tiny config; the init is seeded
        elif weight_paths:
            fingerprint[0] = file_digests(weight_paths, Path(model_cfg.cache_dir).expanduser() / "file_digests.json")
        else:
            fingerprint[0] = weights_fingerprint(model)
    dist.broadcast_objects(fingerprint)
    return fingerprint[0]


def base_fingerprint(cfg: DictConfig, model, source, dist: DistInfo) -> str:
    """reference_fingerprint of the run's base model (the caches keyed by its weights: reference, inspection)."""
    return reference_fingerprint(model, cfg.model, weight_files(cfg.model, source), cfg.trainer.seed, dist)


def cache_key(pairs: list[TokenizedPair], model_identity: str, fingerprint: str) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{model_identity}|{fingerprint}".encode())
    for pair in pairs:
        for ids in pair_key(pair):
            digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes() + b"|")
    return digest.hexdigest()[:24]


def compute_reference_logps(
    model, pairs: list[TokenizedPair], cfg: DictConfig, dist: DistInfo, device, pad_token_id: int
) -> torch.Tensor:
    """(N, 4) REFERENCE_COLUMNS of each pair; each rank computes a strided shard, then all ranks gather
    (sharding.py)."""
    reference = ModelReference(model, cfg.trainer.logp_chunk_size)
    layout = BatchLayout.from_trainer(cfg.trainer)

    def score(indices: list[int], peer_scored_tokens: int) -> torch.Tensor:
        chunk = [pairs[index] for index in indices]
        batch = layout.build(pair_groups(chunk), pad_token_id).to(device)
        return torch.stack(reference.logps(chunk, batch, peer_scored_tokens), dim=1)

    was_training = model.training
    model.eval()
    try:
        return sharded_pass(
            len(pairs), cfg.trainer.eval_batch_size, dist, score, lambda index: pair_scored_tokens(pairs[index])
        )
    finally:
        model.train(was_training)


def values_digest(values: torch.Tensor) -> str:
    return hashlib.sha256(values.double().contiguous().numpy().tobytes()).hexdigest()


def load_cache(path: Path, key: str, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
    """The cached values (a tensor of `shape`), or None when absent, unreadable, altered or not the one this run needs
    (then it is rebuilt). The reference pass and `prefopt inspect` (inspection.py) keep their values so."""
    if not path.exists():
        return None
    try:
        stored = torch.load(path, weights_only=True)
        values = stored["values"]
        if stored["key"] != key or tuple(values.shape) != tuple(shape) or not torch.isfinite(values).all():
            raise ValueError(f"key/shape mismatch ({stored['key']}, {tuple(values.shape)})")
        if stored.get("digest") != values_digest(values):
            raise ValueError("its values do not match their stored digest")
        return values
    except Exception as error:  # a truncated or foreign file: never trust it
        log.warning("cache %s is corrupt or mismatched (%s): rebuilding it", path, error)
        return None


def save_cache(path: Path, key: str, values: torch.Tensor, setting: str) -> None:
    """Write values under key atomically, beside a lock (a sweep's jobs may build the same cache at once); a full or
    read-only disk is a warning naming `setting` (the cache dir's config key): the values are right, only not kept."""
    buffer = io.BytesIO()  # serialized in memory: the file is then written like every other (one temp scheme)
    torch.save({"key": key, "values": values, "digest": values_digest(values)}, buffer)
    try:
        with exclusive_lock(path.with_suffix(".lock")):
            atomic_write_bytes(path, buffer.getvalue())  # a reader sees the old file or the whole new one
    except OSError as error:
        log.warning(
            "%s=%s cannot be written (%s: %s): the values are not cached; point %s at a writable directory with free "
            "space",
            setting,
            path.parent,
            error.strerror or error,
            error.filename or path,
            setting,
        )


SPOT_CHECK_PAIRS = 2


def matches_the_policy(
    values: torch.Tensor, model, pairs: list[TokenizedPair], cfg: DictConfig, device, pad_token_id: int, path: Path
) -> bool:
    """At step 0 the policy *is* the reference, so its log-probs of the first pairs must equal the cached
    values (their rewards are 0). A cache whose key matches but whose values are wrong (written by
    other code, or edited) fails this and is rebuilt."""
    import math

    dummy_dist = DistInfo()
    fresh = compute_reference_logps(model, pairs[:SPOT_CHECK_PAIRS], cfg, dummy_dist, device, pad_token_id)
    cached = values[:SPOT_CHECK_PAIRS]
    worst = float((fresh - cached).abs().max())
    tolerance = 1e-3 + 1e-4 * float(cached.abs().max())  # batch composition changes rounding a little
    if not math.isfinite(worst) or worst > tolerance:
        log.warning(
            "reference cache %s does not match the model at step 0 (log-probs differ by %.3g on its first pairs): "
            "rebuilding it",
            path,
            worst,
        )
        return False
    return True


def precomputed_reference(
    model,
    model_identity: str,
    fingerprint: str,
    pairs: list[TokenizedPair],
    cfg: DictConfig,
    dist: DistInfo,
    device,
    pad_token_id: int,
) -> CachedReference:
    key = cache_key(pairs, model_identity, fingerprint)
    path = Path(cfg.reference.cache_dir).expanduser() / f"{key}.pt"
    values = load_cache(path, key, (len(pairs), len(REFERENCE_COLUMNS)))
    if values is not None and not matches_the_policy(values, model, pairs, cfg, device, pad_token_id, path):
        values = None
    hit = torch.tensor([values is not None], dtype=torch.float64)
    if dist.sum(float(hit)) == dist.world_size:
        if dist.is_main:
            log.info("reference cache hit: %s", path)
    else:
        if dist.is_main:
            log.info("reference cache miss: computing reference log-probs for %d pairs into %s", len(pairs), path)
        values = compute_reference_logps(model, pairs, cfg, dist, device, pad_token_id)
        if dist.is_main:
            save_cache(path, key, values, "reference.cache_dir")
        dist.barrier()
    return CachedReference({pair_key(pair): tuple(row) for pair, row in zip(pairs, values.tolist())}, device)


def precompute_enabled(reference_cfg: DictConfig) -> bool:
    """reference.precompute: auto (the default) and true precompute; false keeps a reference model."""
    return str(reference_cfg.precompute).lower() in ("auto", "true")


def build_reference(
    cfg: DictConfig,
    policy,
    source,
    pairs: list[TokenizedPair],
    needs_reference: bool,
    dist: DistInfo,
    device,
    pad_token_id: int,
):
    """Call before the policy is wrapped by DeepSpeed: the initial policy *is* the reference here.
    `pairs`: every pair the run will score against the reference (visited train pairs and eval pairs)."""
    if not needs_reference:
        return None
    if precompute_enabled(cfg.reference):
        fingerprint = base_fingerprint(cfg, policy, source, dist)
        return precomputed_reference(policy, source.identity, fingerprint, pairs, cfg, dist, device, pad_token_id)
    if cfg.model.lora.enabled:
        return ModelReference(policy, cfg.trainer.logp_chunk_size, adapters_off=True)
    return frozen_copy_reference(cfg, policy, dist.world_size)


def frozen_copy_reference(cfg: DictConfig, policy, world_size: int) -> ModelReference:
    """A frozen copy of the policy as it is now (the initial policy), under DeepSpeed an inference engine."""
    frozen = wrap_reference(freeze(copy.deepcopy(policy)), cfg, world_size)
    return ModelReference(frozen, cfg.trainer.logp_chunk_size)


def cover_pairs(
    reference,
    cfg: DictConfig,
    policy,
    source,
    pairs: list[TokenizedPair],
    dist: DistInfo,
    device,
    pad_token_id: int,
) -> None:
    """A precomputed reference (build_reference's, before the policy trains) also scores `pairs`: those it lacks are
    precomputed as one more cache of their own, so the training pairs' cache, its key and its values stay as they
    are. A reference model (or none) needs nothing."""
    if not isinstance(reference, CachedReference):
        return
    missing = [pair for pair in pairs if pair_key(pair) not in reference.table]
    if missing:
        fingerprint = base_fingerprint(cfg, policy, source, dist)
        extra = precomputed_reference(policy, source.identity, fingerprint, missing, cfg, dist, device, pad_token_id)
        reference.table |= extra.table


def training_reference_pairs(data: PreferenceData, cfg: DictConfig, world_size: int) -> list[TokenizedPair]:
    """Exactly the pairs a training run scores against the reference: the training pairs its seeded sampler will
    draw (so a precomputed reference never does more work than computing it on the fly) and the eval
    pairs its evals score."""
    trainer_cfg = cfg.trainer
    draws = trainer_cfg.max_steps * trainer_cfg.grad_accum * trainer_cfg.micro_batch_size * world_size
    visited = sorted(set(training_sampler(data.train, trainer_cfg, world_size).next_indices(draws)))
    eval_count = (
        len(data.eval)
        if trainer_cfg.max_eval_batches is None
        else trainer_cfg.max_eval_batches * trainer_cfg.eval_batch_size
    )
    return [data.train[index] for index in visited] + data.eval[:eval_count]


def eval_reference_pairs(data: PreferenceData, cfg: DictConfig, world_size: int) -> list[TokenizedPair]:
    """The pairs `prefopt eval` scores against the reference: every eval pair (it trains on none)."""
    return data.eval
