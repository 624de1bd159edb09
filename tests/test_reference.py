"""The reference model three ways: frozen copy, LoRA adapters off, and the precomputed cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prefopt.observe.tracking import read_jsonl
from prefopt.train.reference import REFERENCE_COLUMNS, cache_key, weights_fingerprint
from tests.helpers import run_train

TINY = [
    "model=tiny_llama",
    "trainer.micro_batch_size=2",
    "trainer.eval_batch_size=4",
    "trainer.lr=1e-3",
    "trainer.max_steps=3",
    "dataset.arith.num_train=16",
    "dataset.arith.num_eval=4",
    "trainer.greedy_eval_examples=0",
    "dynamics.num_probes=2",
    "logger.wandb.mode=disabled",
    "trainer.save_final=false",
]


def train_losses(run_dir):
    return [row["train/loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row]


def run_log(run_dir) -> str:
    return "".join(path.read_text() for path in run_dir.glob("*.log"))


def test_precomputed_reference_equals_on_the_fly_and_is_reused(tmp_path):
    cache = f"reference.cache_dir={tmp_path / 'cache'}"
    on_the_fly = train_losses(run_train(tmp_path / "live", *TINY, "reference.precompute=false"))
    first = run_train(tmp_path / "first", *TINY, "reference.precompute=true", cache)
    assert "reference cache miss" in run_log(first)
    second = run_train(tmp_path / "second", *TINY, "reference.precompute=true", cache, "loss=ipo")
    assert "reference cache hit" in run_log(second)  # another loss, same data + reference: shared
    assert train_losses(first) == pytest.approx(on_the_fly, rel=1e-6)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_reference_free_loss_loads_no_reference(tmp_path, monkeypatch):
    import prefopt.train.reference as reference

    frozen = []
    monkeypatch.setattr(reference, "freeze", lambda model: frozen.append(model) or model)
    run_train(tmp_path / "simpo", *TINY, "loss=simpo")
    assert frozen == []
    run_train(tmp_path / "dpo", *TINY, "loss=dpo", "reference.precompute=false")
    assert len(frozen) == 1


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path):
    cache_dir = tmp_path / "cache"
    run_train(tmp_path / "first", *TINY, "reference.precompute=true", f"reference.cache_dir={cache_dir}")
    [cache_file] = cache_dir.glob("*.pt")
    cache_file.write_bytes(b"not a torch file")
    again = run_train(tmp_path / "again", *TINY, "reference.precompute=true", f"reference.cache_dir={cache_dir}")
    assert "corrupt or mismatched" in run_log(again)
    assert torch.load(cache_file, weights_only=True)["values"].shape[1] == len(REFERENCE_COLUMNS)
    assert train_losses(again) == pytest.approx(train_losses(tmp_path / "first"), rel=1e-6)


def test_a_full_cache_disk_is_a_warning_naming_the_key_and_leaves_no_temp(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError: the cache is serialized in memory and written by
    atomic_write_bytes, whose OSError is the one caught: the run trains on, uncached, and says which key to change."""
    import errno
    import os

    import prefopt.train.reference as reference

    real_save = torch.save

    def save(obj, target, *args, **kwargs):
        if isinstance(target, (str, os.PathLike)):  # to a file on a full disk: what torch says then
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: file write failed")
        return real_save(obj, target, *args, **kwargs)

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(
        reference, "atomic_write_bytes", full, raising=False
    )  # raising=False: red on the old torch.save-to-file code too
    cache_dir = tmp_path / "cache"
    run_dir = run_train(tmp_path / "run", *TINY, "reference.precompute=true", f"reference.cache_dir={cache_dir}")
    assert f"reference.cache_dir={cache_dir} cannot be written (No space left on device" in run_log(run_dir)
    assert len(train_losses(run_dir)) == 3
    assert [path.name for path in cache_dir.iterdir()] == [next(cache_dir.glob("*.lock")).name]  # no temp left


def test_cache_key_changes_with_data_and_reference():
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefopt.data import TokenizedPair

    pair = TokenizedPair([1, 2], [3, 4], [5, 6], "p", "c", "r", None, 0)
    other = TokenizedPair([1, 2], [3, 4], [5, 7], "p", "c", "r", None, 0)
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=8,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    fingerprint = weights_fingerprint(model)
    base = cache_key([pair], "tiny", fingerprint)
    assert cache_key([pair], "tiny", fingerprint) == base
    assert cache_key([other], "tiny", fingerprint) != base  # data (token ids) changed
    assert cache_key([pair], "other-model", fingerprint) != base  # reference identity changed
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    assert cache_key([pair], "tiny", weights_fingerprint(model)) != base  # reference weights changed


def test_lora_trains_adapters_with_no_second_model(tmp_path, monkeypatch):
    import prefopt.model.loading as models
    import prefopt.train.reference as reference

    loads, frozen = [], []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))  # load_run_model's
    monkeypatch.setattr(reference, "freeze", lambda model: frozen.append(model) or model)
    run_dir = run_train(tmp_path / "lora", *TINY, "model.lora.enabled=true", "model.lora.r=4", "trainer.save_every=3")
    assert loads == [1] and frozen == []  # one model in memory: the reference is the base, adapters off
    losses = train_losses(run_dir)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at B = 0: policy == reference
    assert all(math.isfinite(loss) for loss in losses)
    policy_dir = run_dir / "checkpoints" / "step-000003" / "policy"
    assert (policy_dir / "adapter_model.safetensors").is_file() and not (policy_dir / "model.safetensors").exists()

    from transformers import AutoModelForCausalLM

    from prefopt.run.export import export_policy

    merged = AutoModelForCausalLM.from_pretrained(export_policy(run_dir, tmp_path / "merged"))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    summary_free = json.loads((run_dir / "summary.json").read_text())
    assert math.isfinite(summary_free["eval/loss"])


def test_auto_precomputes_exactly_the_visited_pairs(tmp_path, monkeypatch):
    """The default (reference.precompute=auto) scores only the training pairs the seeded sampler draws plus
    the eval pairs: never more reference work than computing it on the fly."""
    import prefopt.train.reference as reference

    scored = []
    original = reference.compute_reference_logps
    monkeypatch.setattr(
        reference,
        "compute_reference_logps",
        lambda model, pairs, *args: scored.append(len(pairs)) or original(model, pairs, *args),
    )
    run_dir = run_train(
        tmp_path / "run", *TINY, "dataset.arith.num_train=64", f"reference.cache_dir={tmp_path / 'cache'}"
    )
    # 3 steps x 2 pairs = 6 draws from 64 pairs, plus 4 eval pairs (the first call is the 2-pair spot check of a hit,
    # absent here)
    assert scored == [6 + 4]
    assert "reference cache miss" in run_log(run_dir)
