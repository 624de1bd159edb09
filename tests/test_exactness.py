"""Training is exact where it must be: gradient accumulation equals one big micro batch (both engines),
the exported policy is the trained one (full fine-tune, ZeRO-3 gathered, LoRA merged), and LoRA trains."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from prefopt.data import build_preference_data, collate_pairs
from prefopt.model.loading import load_model, load_tokenizer, resolve_model_source
from prefopt.model.logps import response_token_logps, split_pairs
from prefopt.observe.tracking import read_jsonl
from prefopt.run.worker import load_frozen_config
from tests.helpers import run_train

TINY = [
    "model=tiny_llama",
    "trainer.eval_batch_size=4",
    "dataset.arith.num_train=24",
    "dataset.arith.num_eval=6",
    "trainer.greedy_eval_examples=0",
    "dynamics.enabled=false",
    "logger.wandb.mode=disabled",
    "trainer.warmup_steps=0",
    "trainer.lr=1e-3",
]


def exported_weights(run_dir):
    [checkpoint] = sorted((run_dir / "checkpoints").glob("step-*"))
    return load_file(checkpoint / "policy" / "model.safetensors")


def initial_weights(run_dir):
    cfg = load_frozen_config(run_dir / "config.yaml")
    return load_model(
        cfg.model, resolve_model_source(cfg.model), len(load_tokenizer(cfg.model)), cfg.trainer.seed
    ).state_dict()


ENGINES = [pytest.param("torch", id="torch"), pytest.param("deepspeed", id="deepspeed", marks=pytest.mark.slow)]


@pytest.mark.parametrize("engine", ENGINES)
def test_gradient_accumulation_is_exact(tmp_path, engine):
    """4 pairs x 1 == 2 pairs x 2 == 1 pair x 4: same pairs, same order, so the same run.

    Weights after 3 steps agree per tensor to 1e-5 relative (measured: <= 7e-6; what remains is float
    rounding of differently shaped sums, which AdamW amplifies for near-zero gradients), and every
    step's logged loss, margin and pre-clip gradient norm to 1e-4 (packed rows differ in composition
    between the three: measured <= 1.5e-5)."""
    runs, weights = {}, {}
    for micro_batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        runs[micro_batch] = run_train(
            tmp_path / f"mb{micro_batch}",
            *TINY,
            f"hardware.engine={engine}",
            "trainer.max_steps=3",
            f"trainer.micro_batch_size={micro_batch}",
            f"trainer.grad_accum={accumulation}",
        )
        weights[micro_batch] = exported_weights(runs[micro_batch])
    initial = initial_weights(runs[4])
    assert any(not torch.equal(weights[4][name], initial[name]) for name in initial)
    for micro_batch in (2, 1):
        for name, reference in weights[4].items():
            relative = float((reference - weights[micro_batch][name]).norm() / reference.norm())
            assert relative < 1e-5, (micro_batch, name, relative)
        for row, other in zip(train_rows(runs[4]), train_rows(runs[micro_batch]), strict=True):
            for key in ("train/loss", "train/grad_norm", "train/rewards/margins", "train/logits/chosen"):
                assert other[key] == pytest.approx(row[key], rel=1e-4, abs=1e-7), (micro_batch, row["step"], key)


def train_rows(run_dir):
    return [row for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row]


def eval_logps_of(model, run_dir):
    """Mean summed chosen / rejected log-probs of the run's eval pairs under `model` (as the trainer's eval computes
    them)."""
    cfg = load_frozen_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    data = build_preference_data(cfg.dataset, tokenizer, cfg.trainer.seed)
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(data.eval), 4):
            batch = collate_pairs(data.eval[start : start + 4], tokenizer.pad_token_id)
            logps = response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], 64).summed
            chosen_part, rejected_part = split_pairs(logps)
            chosen.append(chosen_part)
            rejected.append(rejected_part)
    return float(torch.cat(chosen).mean()), float(torch.cat(rejected).mean())


def assert_export_is_the_trained_model(run_dir, exported_dir):
    from transformers import AutoModelForCausalLM

    summary = json.loads((run_dir / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(exported_dir, dtype=torch.float32)
    chosen, rejected = eval_logps_of(model, run_dir)
    # the final eval ran on the trained model in memory, right before it was exported
    assert chosen == pytest.approx(summary["eval/logps/chosen"], rel=1e-5)
    assert rejected == pytest.approx(summary["eval/logps/rejected"], rel=1e-5)
    assert abs(summary["eval/delta/logps/chosen"]) > 1e-3  # training moved it, so this is not the initial model


def test_full_fine_tune_export_equals_the_trained_model(tmp_path):
    run_dir = run_train(tmp_path / "run", *TINY, "trainer.max_steps=3", "trainer.micro_batch_size=2")
    [checkpoint] = sorted((run_dir / "checkpoints").glob("step-*"))
    assert_export_is_the_trained_model(run_dir, checkpoint / "policy")


@pytest.mark.slow
def test_zero3_export_gathers_the_trained_model(tmp_path):
    run_dir = run_train(
        tmp_path / "run",
        *TINY,
        "hardware=cpu_2proc",
        "hardware.zero_stage=3",
        "trainer.max_steps=3",
        "trainer.micro_batch_size=2",
    )
    [checkpoint] = sorted((run_dir / "checkpoints").glob("step-*"))
    assert_export_is_the_trained_model(run_dir, checkpoint / "policy")


def test_lora_trains_its_adapters_and_the_merged_export_is_the_trained_model(tmp_path):
    from prefopt.run.export import export_policy

    run_dir = run_train(
        tmp_path / "run",
        *TINY,
        "model.lora.enabled=true",
        "model.lora.r=4",
        "trainer.lr=1e-2",
        "trainer.max_steps=4",
        "trainer.micro_batch_size=2",
    )
    [checkpoint] = sorted((run_dir / "checkpoints").glob("step-*"))
    adapters = load_file(checkpoint / "policy" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapters.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().max() > 0 for tensor in lora_b)  # B starts at 0: every adapter trained
    losses = [row["train/loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row]
    assert abs(losses[-1] - losses[0]) > 1e-3
    merged = export_policy(run_dir, tmp_path / "merged")
    assert not any("lora" in name for name in load_file(merged / "model.safetensors"))
    assert_export_is_the_trained_model(run_dir, merged)
