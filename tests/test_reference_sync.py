"""A moving reference (reference.sync, TR-DPO): the mix on the weights against its formula, LoRA's reference adapter,
the invariant a hard sync leaves in a run's metrics, a stop and resume that restores the reference, the refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prefopt.core.errors import CheckpointError, ConfigError
from prefopt.observe.tracking import read_jsonl
from prefopt.run.config import validate_config
from prefopt.train.reference_sync import (
    ReferenceSync,
    active_adapter,
    adapter_pairs,
    add_reference_adapter,
    copy_pairs,
)
from tests.helpers import preset, run_train, tiny_byte_llama
from tests.test_config import compose_config

TINY = [
    "model=tiny_llama",
    "hardware=cpu",
    "trainer.micro_batch_size=2",
    "trainer.eval_batch_size=4",
    "trainer.lr=1e-3",
    "trainer.warmup_steps=0",
    "dataset.arith.num_train=16",
    "dataset.arith.num_eval=4",
    "trainer.greedy_eval_examples=0",
    "dynamics.enabled=false",
    "logger.wandb.mode=disabled",
]


def sync_node(mode: str, every: int = 1, alpha: float = 0.6):
    from omegaconf import OmegaConf

    return OmegaConf.create({"sync": mode, "sync_every": every, "mixup_alpha": alpha})


def perturbed(model, seed: int):
    """A copy of `model` with every weight moved (a policy some steps later)."""
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return moved


def test_soft_and_hard_syncs_equal_their_formulas_and_the_state_round_trips(byte_tokenizer, tmp_path):
    reference = tiny_byte_llama(byte_tokenizer, seed=0)
    policy = perturbed(reference, seed=1)
    old = {name: p.detach().double().clone() for name, p in reference.named_parameters()}
    sync = ReferenceSync(sync_node("soft", every=2, alpha=0.6), copy_pairs(reference, policy))
    assert not sync.after_step(1) and sync.sync_steps == []  # not due: nothing moves
    assert all(torch.equal(p.double(), old[name]) for name, p in reference.named_parameters())
    assert sync.after_step(2) and sync.sync_steps == [2]
    for name, parameter in reference.named_parameters():  # alpha * policy + (1 - alpha) * old, in float64
        expected = 0.6 * dict(policy.named_parameters())[name].double() + 0.4 * old[name]
        torch.testing.assert_close(parameter.double(), expected, rtol=2e-7, atol=1e-7)

    sync.save(tmp_path)  # the checkpoint's file restores the mixed reference bit for bit into a fresh copy
    restored_model = tiny_byte_llama(byte_tokenizer, seed=0)
    restored = ReferenceSync(sync_node("soft", every=2, alpha=0.6), copy_pairs(restored_model, policy))
    restored.load(tmp_path)
    assert restored.sync_steps == [2]
    assert all(torch.equal(a, b) for a, b in zip(restored_model.parameters(), reference.parameters()))
    with pytest.raises(CheckpointError, match="holds no reference weights"):
        restored.load(tmp_path / "elsewhere")

    hard = ReferenceSync(sync_node("hard", every=2), copy_pairs(reference, policy))
    assert hard.after_step(4)
    assert all(torch.equal(r, p) for r, p in zip(reference.parameters(), policy.parameters()))


def test_lora_reference_adapter_starts_as_the_base_and_a_hard_sync_makes_it_the_policy(byte_tokenizer):
    from prefopt.model.loading import apply_lora

    lora = preset("model", "tiny_llama", lora={"enabled": True, "r": 4, "dropout": 0.1}).lora
    policy = apply_lora(tiny_byte_llama(byte_tokenizer, seed=0), lora)
    policy.eval()  # dropout aside: the reference adapter has none, the policy's here would draw
    ids = torch.tensor([[5, 9, 13, 40, 41, 7]])
    with torch.no_grad(), policy.disable_adapter():
        base = policy(ids).logits
    rng = torch.get_rng_state()
    add_reference_adapter(policy)
    assert torch.equal(torch.get_rng_state(), rng)  # PEFT's init draws do not move the run's random stream
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in name for name in trainable)  # the reference adapter never trains
    with torch.no_grad():
        for reference_param, policy_param in adapter_pairs(policy):  # the policy trains: B leaves 0
            policy_param.add_(torch.randn_like(policy_param) * 0.1)
        with active_adapter(policy, "reference"):
            assert torch.equal(policy(ids).logits, base)  # copied at B = 0: the base model exactly
        moved = policy(ids).logits
        assert not torch.allclose(moved, base)
        ReferenceSync(sync_node("hard"), adapter_pairs(policy)).after_step(1)
        with active_adapter(policy, "reference"):
            assert torch.equal(policy(ids).logits, moved)
    assert {name for name, p in policy.named_parameters() if p.requires_grad} == trainable  # restored after the pass


def train_rows(run_dir):
    return {row["step"]: row for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row}


@pytest.mark.slow  # 3 one-rank runs and one 2-rank launch (torchrun, DeepSpeed on gloo)
def test_a_full_sync_zeroes_the_next_steps_rewards_resumes_exactly_and_two_ranks_equal_one(tmp_path):
    """Soft with alpha 1 (TRL's arithmetic: ref * 0 + policy, i.e. hard) every 2 steps: the reference is the policy at
    steps 1 (the initial one) and 3 (synced after step 2), so their rewards are exactly 0; at steps 2 and 4 the
    policy has moved one step past it. A stop after step 3 (checkpoint after the sync at 2) and its resume must give
    step 4 the synced reference, not the initial one. Two ranks (ZeRO-2: each holds the whole policy and reference
    and syncs its own copy) on the same global batch log what one rank does. Gated loss, packed rows."""
    common = [
        *TINY,
        "loss=gate_dpo",
        "reference.sync=soft",
        "reference.mixup_alpha=1.0",
        "reference.sync_every=2",
        "trainer.max_steps=4",
        "trainer.save_every=3",
    ]
    straight = run_train(tmp_path / "straight", *common, "trainer.micro_batch_size=4")
    rows = train_rows(straight)
    for step in (1, 3):
        assert rows[step]["train/rewards/chosen"] == rows[step]["train/rewards/rejected"] == 0.0, step
    for step in (2, 4):
        assert abs(rows[step]["train/rewards/chosen"]) > 1e-4, step
    assert [rows[step]["train/reference/syncs"] for step in (1, 2, 3, 4)] == [0, 1, 1, 2]
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["reference/sync_steps"] == [2, 4] and summary["reference/syncs"] == 2
    log = "".join(path.read_text() for path in straight.glob("*.log"))
    assert "reference.precompute=auto keeps a live reference model" in log
    assert (straight / "checkpoints" / "step-000003" / "reference_state.pt").is_file()

    stopped = run_train(tmp_path / "stopped", *common, "trainer.micro_batch_size=4", "trainer.stop_after=3")
    run_train(stopped, *common, "trainer.micro_batch_size=4", "trainer.resume=true")
    resumed = train_rows(stopped)
    assert sorted(resumed) == [1, 2, 3, 4]
    for key in ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/reference/syncs"):
        assert resumed[4][key] == pytest.approx(rows[4][key], rel=1e-6, abs=1e-9), key
    resumed_summary = json.loads((stopped / "summary.json").read_text())
    assert resumed_summary["reference/sync_steps"] == [2, 4]
    assert resumed_summary["eval/loss"] == pytest.approx(summary["eval/loss"], rel=1e-6)

    two = run_train(
        tmp_path / "two", *common, "hardware=cpu_2proc", "hardware.zero_stage=2", "trainer.micro_batch_size=2"
    )
    rows_two = train_rows(two)
    assert sorted(rows_two) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        for key in ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/reference/syncs"):
            assert rows_two[step][key] == pytest.approx(rows[step][key], rel=1e-5, abs=1e-6), (step, key)
    summary_two = json.loads((two / "summary.json").read_text())
    assert summary_two["eval/loss"] == pytest.approx(summary["eval/loss"], rel=1e-5)
    assert summary_two["reference/sync_steps"] == [2, 4]


@pytest.mark.parametrize(
    "engine", [pytest.param("torch", id="torch"), pytest.param("deepspeed", id="deepspeed", marks=pytest.mark.slow)]
)
def test_lora_hard_sync_every_step_keeps_the_rewards_at_zero(tmp_path, engine):
    run_dir = run_train(
        tmp_path / "lora",
        *TINY,
        f"hardware.engine={engine}",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "reference.sync=hard",
        "reference.sync_every=1",
        "trainer.max_steps=2",
    )
    rows = train_rows(run_dir)
    assert rows[2]["train/rewards/chosen"] == rows[2]["train/rewards/rejected"] == 0.0  # the reference is step 1's
    assert rows[2]["train/logps/chosen"] != rows[1]["train/logps/chosen"]  # while the policy moved
    checkpoint = run_dir / "checkpoints" / "step-000002"
    saved = torch.load(checkpoint / "reference_state.pt", weights_only=True)
    assert saved["sync_steps"] == [1, 2] and saved["weights"]  # the reference adapter's factors
    assert (checkpoint / "policy" / "adapter_model.safetensors").is_file()  # the policy adapter, loaders' default
    assert not (checkpoint / "policy" / "reference").exists()  # and nothing else: policy/ is the policy


REFUSALS = [  # (settings on top of model=tiny_llama hardware=cpu, what the one-line refusal says)
    ({"reference.sync": "hard", "reference.precompute": True}, "a cache of a reference that moves would be stale"),
    ({"reference.sync": "soft", "model.lora.enabled": True}, "mixing the LoRA factors"),
    ({"reference.sync": "hard", "hardware.engine": "deepspeed", "hardware.zero_stage": 3}, "ZeRO-3"),
    ({"reference.sync": "hard", "loss": {"name": "simpo", "beta": 2.0, "gamma": 1.6}}, "has no reference"),
    ({"reference.sync": "soft", "reference.mixup_alpha": 0.0}, r"reference\.mixup_alpha=0"),
    ({"reference.sync": "soft", "reference.sync_every": 0}, r"reference\.sync_every"),
]


def test_refusals_name_the_keys_and_the_reason():
    from omegaconf import OmegaConf

    base = compose_config(["model=tiny_llama", "hardware=cpu"])
    validate_config(base)
    for settings, message in REFUSALS:
        cfg = copy.deepcopy(base)
        for key, value in settings.items():
            OmegaConf.update(cfg, key, value, merge=False)  # a whole loss node replaces the default's
        with pytest.raises(ConfigError, match=message) as refused:
            validate_config(cfg)
        assert "\n" not in str(refused.value), settings
