"""On-policy arith pairs (dataset.arith.rejected_style=onpolicy): the model answers each question itself, and a wrong
answer among its samples becomes the pair's rejected response (data/arith.py picks it with the answer checker).

Why: most preference data today is on-policy (UltraFeedback-style pipelines sample both responses from the model being
trained), so the rejected answer is probable: neither a near miss of the answer key nor a stranger's text.

How the samples are drawn, and why each choice:
- From the run's base model as loaded (its weights, model.dtype's compute dtype), before any training: a resumed run
  and `prefopt eval` rebuild the same pairs, whatever the checkpoint holds.
- In fixed groups of questions_per_batch questions (consecutive in arith_questions' order), `samples` copies of each
  in one left-padded generate call, under a torch seed of the group's own drawn from trainer.seed and the group's
  index. A group's samples therefore depend only on the config, never on which rank draws it: 2 ranks give exactly
  what 1 rank gives (each rank samples a strided share of the groups, sharding.py, and all ranks gather every
  sample). The generation config is given whole (temperature, no top-k, no top-p, the KV cache on), so the model's
  shipped generation defaults change nothing.
- A sample is usable when it ended (EOS or the template's end of turn) within max_new_tokens and says something.
- Cached in dataset.cache_dir as onpolicy-<key>.json, written atomically by rank 0. The key covers the model's identity
  and its weights' fingerprint (the weight files' digests; a random tiny model's seed; weights only in memory: their
  bytes), the compute dtype, the tokenizer, the questions' prompt token ids and the sampling settings, so other weights
  never read these samples. The parent (hardware=auto, the resume check) reads the cache and never samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from prefopt.core.distributed import DistInfo
from prefopt.core.fileutil import atomic_write_json
from prefopt.data.arith import arith_questions, question_prompt
from prefopt.data.cache import tokenizer_fingerprint
from prefopt.data.pipeline import string_prompts_use_chat_template
from prefopt.data.tokenize import PairEncoder, end_of_turn_ids
from prefopt.data.truncation import TruncationLimits
from prefopt.model.loading import ModelSource, load_run_model, resolve_model_source, weight_files
from prefopt.train.reference import reference_fingerprint
from prefopt.train.sharding import sharded_objects

log = logging.getLogger("prefopt")

SAMPLES_VERSION = 1  # bump when the sampling changes what the same settings draw
Samples = list[list[str]]  # per arith question (arith_questions' order), its usable samples in drawn order


def is_onpolicy(dataset_cfg: DictConfig) -> bool:
    return dataset_cfg.name == "arith" and dataset_cfg.arith.rejected_style == "onpolicy"


def group_seed(seed: int, group: int) -> int:
    """The torch seed of a group of questions' samples: apart per group, the same on every rank and every run."""
    return int(hashlib.sha256(f"arith-onpolicy|{seed}|{group}".encode()).hexdigest()[:15], 16)


class OnPolicySampler:
    """The questions' generation prompts and the cache entry their samples live in."""

    def __init__(self, model_cfg: DictConfig, dataset_cfg: DictConfig, seed: int, source: ModelSource, tokenizer):
        self.model_cfg = model_cfg
        self.dataset_cfg = dataset_cfg
        self.seed = seed
        self.source = source
        self.tokenizer = tokenizer
        self.settings = OmegaConf.to_container(dataset_cfg.arith.onpolicy, resolve=True)
        questions, _ = arith_questions(dataset_cfg.arith, seed)
        self.prompts = [question_prompt(*question) for question in questions]
        use_template = string_prompts_use_chat_template(dataset_cfg.chat_template, "strings", tokenizer)
        encoder = PairEncoder(tokenizer, TruncationLimits.from_config(dataset_cfg), use_chat_template=use_template)
        self.prompt_ids = [encoder.prompt_ids(prompt) for prompt in self.prompts]

    def key(self, fingerprint: str) -> str:
        described = {
            "version": SAMPLES_VERSION,
            "model": self.source.identity,
            "weights": fingerprint,
            "dtype": self.model_cfg.dtype,
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "seed": self.seed,
            "prompt_ids": hashlib.sha256(json.dumps(self.prompt_ids).encode()).hexdigest(),
            # chosen is applied to the samples afterwards (data/arith.py): it does not change what is drawn
            "sampling": {name: value for name, value in self.settings.items() if name != "chosen"},
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]

    def cache_path(self, fingerprint: str) -> Optional[Path]:
        cache_dir = self.dataset_cfg.get("cache_dir")
        return Path(cache_dir).expanduser() / f"onpolicy-{self.key(fingerprint)}.json" if cache_dir else None

    def read_cache(self, path: Optional[Path]) -> Optional[Samples]:
        """The cached samples, or None (absent; or unreadable or not these questions': drawn again and rewritten)."""
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            samples = entry["samples"]
            valid = entry["prompts"] == self.prompts and len(samples) == len(self.prompts)
            valid = valid and all(isinstance(text, str) for texts in samples for text in texts)
        except (OSError, ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            log.warning("on-policy samples cache %s is unreadable or holds other questions: sampling again", path)
            return None
        return samples

    def write_cache(self, path: Optional[Path], samples: Samples) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            entry = {"settings": self.settings, "prompts": self.prompts, "samples": samples}
            atomic_write_json(path, entry)


def known_fingerprint(model_cfg: DictConfig, seed: int, source: ModelSource, dist: DistInfo) -> Optional[str]:
    """The base weights' fingerprint where it needs no loaded model (weight files, a tiny model's seed), else None."""
    paths = weight_files(model_cfg, source)
    if source.kind == "tiny" or paths:
        return reference_fingerprint(None, model_cfg, paths, seed, dist)
    return None


def cached_onpolicy_samples(model_cfg: DictConfig, dataset_cfg: DictConfig, seed: int, tokenizer) -> Optional[Samples]:
    """What a parent passes to build_preference_data (no model, no sampling): with rejected_style=onpolicy the cached
    samples, or None when they are not cached yet (build_preference_data then raises OnPolicySamplesNeeded); other
    data: None."""
    if not is_onpolicy(dataset_cfg):
        return None
    source = resolve_model_source(model_cfg)
    fingerprint = known_fingerprint(model_cfg, seed, source, DistInfo())
    if fingerprint is None:
        return None
    sampler = OnPolicySampler(model_cfg, dataset_cfg, seed, source, tokenizer)
    return sampler.read_cache(sampler.cache_path(fingerprint))


def onpolicy_samples(cfg: DictConfig, source: ModelSource, tokenizer, dist: DistInfo, device) -> Samples:
    """The samples of every arith question (cached, or drawn now by all ranks together: module docstring)."""
    sampler = OnPolicySampler(cfg.model, cfg.dataset, cfg.trainer.seed, source, tokenizer)
    fingerprint = known_fingerprint(cfg.model, cfg.trainer.seed, source, dist)
    model = None
    if fingerprint is None:  # weights only in memory: their bytes are the fingerprint
        model = load_sampling_model(cfg, source, tokenizer, device)
        fingerprint = reference_fingerprint(model, cfg.model, None, cfg.trainer.seed, dist)
    path = sampler.cache_path(fingerprint)
    cached = sampler.read_cache(path) if dist.is_main else None  # rank 0 reads, once; the others get its samples
    hit = [cached is not None]
    dist.broadcast_objects(hit)  # rank 0's view decides, so every rank takes the same path (and its collectives)
    if hit[0]:
        samples = cached if cached is not None else [[] for _ in sampler.prompts]
        dist.broadcast_objects(samples)
        log_samples(dist, sampler, samples, f"cache hit {path}")
        return samples
    if model is None:
        model = load_sampling_model(cfg, source, tokenizer, device)
    samples = draw_samples(model, tokenizer, sampler, cfg.trainer.seed, dist, device)
    if dist.is_main:
        sampler.write_cache(path, samples)
    log_samples(dist, sampler, samples, f"cache miss, written to {path}" if path else "not cached")
    return samples


def log_samples(dist: DistInfo, sampler: OnPolicySampler, samples: Samples, cache: str) -> None:
    if dist.is_main:
        settings = sampler.settings
        log.info(
            "arith onpolicy: %d questions x %d samples at temperature %s from the base model (%s): %d of %d usable "
            "(the others unfinished after %d tokens, or empty)",
            len(samples),
            settings["samples"],
            settings["temperature"],
            cache,
            sum(map(len, samples)),
            len(samples) * settings["samples"],
            settings["max_new_tokens"],
        )


def load_sampling_model(cfg: DictConfig, source: ModelSource, tokenizer, device):
    """The base model as the run loads it, in its compute dtype, for sampling only (freed afterwards)."""
    model = load_run_model(cfg.model, source, len(tokenizer), cfg.trainer.seed, device, cfg.hardware.engine)
    model.eval()
    return model


def draw_samples(model, tokenizer, sampler: OnPolicySampler, seed: int, dist: DistInfo, device) -> Samples:
    """The usable samples of each question (usable_text), from sampled_tokens."""
    stop_ids = end_of_turn_ids(tokenizer)
    return [
        [text for text in (usable_text(tokens, stop_ids, tokenizer) for tokens in question) if text is not None]
        for question in sampled_tokens(model, tokenizer, sampler, seed, dist, device)
    ]


@torch.no_grad()
def sampled_tokens(
    model, tokenizer, sampler: OnPolicySampler, seed: int, dist: DistInfo, device
) -> list[list[list[int]]]:
    """The sampled token ids of each question (`samples` lists each, up to max_new_tokens, padding included). The
    questions are cut into fixed groups of questions_per_batch, each group one generate call (left-padded) under a seed
    of its own; each rank draws a strided share of the groups, and all ranks get every sample. A group's samples depend
    on its questions and seed only, never on the rank."""
    from transformers import GenerationConfig

    settings = sampler.settings
    per_group = settings["questions_per_batch"]
    copies = settings["samples"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation = GenerationConfig(
        do_sample=True,
        temperature=float(settings["temperature"]),
        top_k=0,
        top_p=1.0,
        max_new_tokens=settings["max_new_tokens"],
        eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=pad,
        use_cache=True,  # the loaded model has it off (training never uses it); without it sampling is ~4x slower
    )
    forked = [device] if torch.device(device).type == "cuda" else []
    groups = [
        list(range(start, min(start + per_group, len(sampler.prompts))))
        for start in range(0, len(sampler.prompts), per_group)
    ]

    def sample(group: int) -> list[list[list[int]]]:
        prompts = [sampler.prompt_ids[index] for index in groups[group] for _ in range(copies)]
        width = max(map(len, prompts))
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
        with torch.random.fork_rng(devices=forked):  # the run's own random streams are left as they were
            torch.manual_seed(group_seed(seed, group))
            generated = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=generation)
        rows = generated[:, width:].tolist()
        return [rows[place * copies : (place + 1) * copies] for place in range(len(groups[group]))]

    drawn = sharded_objects(len(groups), 1, dist, lambda indices: [sample(group) for group in indices])
    return [question for group in drawn for question in group]


def usable_text(tokens: list[int], stop_ids: list[int], tokenizer) -> Optional[str]:
    """The sample's text up to its end of turn, or None when it did not end in time or says nothing."""
    ends = [position for position, token in enumerate(tokens) if token in stop_ids]
    if not ends:
        return None
    text = tokenizer.decode(tokens[: ends[0]], skip_special_tokens=True)
    return text if text.strip() else None
