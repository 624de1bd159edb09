"""Mixed precision that trains: model.dtype=bf16 keeps fp32 master weights on both engines, so an
update of lr=3e-6 lands in every weight tensor (pure bf16 would round most of it away), and bf16
losses track fp32 losses. Dropout is off by default."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from prefopt.model.loading import disable_dropout, load_model, load_tokenizer, resolve_model_source
from prefopt.observe.tracking import read_jsonl
from prefopt.run.worker import load_frozen_config
from tests.helpers import preset, run_train

TINY = [
    "model=tiny_llama",
    "trainer.eval_batch_size=4",
    "dataset.arith.num_train=16",
    "dataset.arith.num_eval=4",
    "trainer.greedy_eval_examples=0",
    "dynamics.enabled=false",
    "logger.wandb.mode=disabled",
    "trainer.warmup_steps=0",
]


def initial_and_trained(run_dir):
    """(initial weights, exported weights after training) of a tiny run, both fp32."""
    cfg = load_frozen_config(run_dir / "config.yaml")
    initial = load_model(
        cfg.model, resolve_model_source(cfg.model), len(load_tokenizer(cfg.model)), cfg.trainer.seed
    ).state_dict()
    [checkpoint] = sorted((run_dir / "checkpoints").glob("step-*"))
    trained = load_file(checkpoint / "policy" / "model.safetensors")
    return initial, trained


def assert_one_small_step_changes_every_tensor(run_dir):
    initial, trained = initial_and_trained(run_dir)
    assert all(tensor.dtype == torch.float32 for tensor in trained.values())  # the export holds the fp32 master weights
    assert {name: tensor.shape for name, tensor in trained.items()} == {name: initial[name].shape for name in trained}
    changed = [name for name, tensor in trained.items() if not torch.equal(tensor, initial[name])]
    assert len(changed) / len(trained) > 0.99, sorted(set(trained) - set(changed))
    # the RMSNorm weights start at 1.0, where bf16's spacing is 2^-7: a pure-bf16 weight could not hold this update
    norms = [name for name in trained if "norm" in name]
    assert norms and all(0 < (trained[name] - 1.0).abs().max() < 2**-9 for name in norms)


def test_one_bf16_step_at_lr_3e_6_changes_every_weight_tensor_torch_engine(tmp_path):
    run_dir = run_train(tmp_path / "run", *TINY, "model.dtype=bf16", "trainer.lr=3e-6", "trainer.max_steps=1")
    assert_one_small_step_changes_every_tensor(run_dir)


@pytest.mark.slow
def test_one_bf16_step_at_lr_3e_6_changes_every_weight_tensor_deepspeed_two_ranks(tmp_path):
    run_dir = run_train(
        tmp_path / "run",
        *TINY,
        "hardware=cpu_2proc",
        "model.dtype=bf16",
        "trainer.lr=3e-6",
        "trainer.max_steps=1",
        "trainer.micro_batch_size=2",
    )
    assert_one_small_step_changes_every_tensor(run_dir)


def losses(run_dir):
    return [row["train/loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row]


# measured (tiny Llama, lr 1e-3, 10 steps, CPU autocast): largest |bf16 - fp32| loss difference 1.8e-4 while training
# moves the loss by 0.057; the tolerance leaves 10x headroom
BF16_LOSS_TOLERANCE = 2e-3


def test_bf16_mixed_precision_losses_track_fp32(tmp_path):
    common = [*TINY, "trainer.lr=1e-3", "trainer.max_steps=10", "trainer.save_final=false"]
    fp32 = losses(run_train(tmp_path / "fp32", *common, "model.dtype=fp32"))
    bf16 = losses(run_train(tmp_path / "bf16", *common, "model.dtype=bf16"))
    differences = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert len(differences) == 10 and max(differences) < BF16_LOSS_TOLERANCE, differences
    assert max(differences) > 0  # bf16 compute really ran (autocast), or the two runs would be bit-identical
    assert abs(fp32[-1] - fp32[0]) > 10 * BF16_LOSS_TOLERANCE  # and training moved the loss far more than that


def test_dropout_is_off_by_default_and_on_when_asked():
    cfg = preset("model", "tiny_llama")
    model = load_model(cfg, resolve_model_source(cfg), len(load_tokenizer(cfg)), seed=0)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    input_ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    first, second = model(input_ids).logits, model(input_ids).logits
    assert not torch.equal(first, second)  # with dropout on, two training-mode forwards differ
    disable_dropout(model)
    assert torch.equal(model(input_ids).logits, model(input_ids).logits)
    assert model.config.attention_dropout == 0.0


def test_dpo_shift_eval_uses_training_progress():
    """Eval at step k scores dpo_shift with f(k / max_steps), as training at step k does, not f(0)."""
    import copy

    from prefopt.data import build_preference_data
    from prefopt.model.loading import load_tokenizer
    from prefopt.train.evaluation import evaluate
    from prefopt.train.reference import ModelReference
    from prefopt.train.step import PreferenceStep
    from tests.test_config import compose_config

    cfg = compose_config(
        [
            "model=tiny_llama",
            "loss=dpo_shift",
            "loss.shift_schedule=increase",
            "trainer.max_steps=10",
            "dataset.arith.num_train=4",
            "dataset.arith.num_eval=4",
            "hardware=cpu",
        ]
    )
    tokenizer = load_tokenizer(cfg.model)
    data = build_preference_data(cfg.dataset, tokenizer, 0)
    policy = load_model(cfg.model, resolve_model_source(cfg.model), len(tokenizer), seed=0)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference unlike the policy, so the rejected term (scaled by f) is not zero
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    step_fn = PreferenceStep(cfg, policy, ModelReference(reference, 64), torch.device("cpu"), tokenizer.pad_token_id)
    at_start = evaluate(step_fn, data.eval, 4, None, step=0)["eval/loss"]
    at_end = evaluate(step_fn, data.eval, 4, None, step=10)["eval/loss"]
    assert at_start != pytest.approx(at_end, abs=1e-6)
    per_example_at_end = step_fn(data.eval, step=10).per_example
    assert at_end == pytest.approx(float(per_example_at_end["loss"].mean()), rel=1e-6)
