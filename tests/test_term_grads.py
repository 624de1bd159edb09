"""dynamics.term_grads: the per-term gradient norms equal backward passes done by hand, the gate's share is the gate
when every pair has the same gate, the run's training is untouched, LoRA norms cover the adapters, bad configs fail."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.data import TokenizedPair
from prefopt.data.layout import pair_groups
from prefopt.losses import preference_loss
from prefopt.model.logps import sequence_logps, split_pairs
from prefopt.observe.tracking import read_jsonl
from prefopt.train.engine import trainable_parameters
from prefopt.train.reference import ModelReference
from prefopt.train.step import PreferenceStep
from prefopt.train.term_grads import TermGradients, term_gradient_pairs
from tests.helpers import run_train, tiny_byte_llama, trainer_node
from tests.test_config import compose_config
from tests.test_train import TINY

STEP, MAX_STEPS = 3, 10
GRAD_KEYS = ("chosen_norm", "rejected_norm", "cos", "total_norm")
GATED_KEYS = ("rejected_gated_norm", "cos_gated", "gate_ratio")


def make_pair(tokenizer, index: int) -> TokenizedPair:
    """Pairs of different lengths whose responses differ in more than their last digit."""
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    prompt, chosen, rejected = f"Q{index}: {index} * 7?", f"{index * 7}" + " ok" * (index % 3), f"{index * 7 + 5} no"
    eos = [tokenizer.eos_token_id]
    return TokenizedPair(
        ids(prompt), ids(chosen) + eos, ids(rejected) + eos, prompt, chosen, rejected, str(index * 7), index
    )


@pytest.fixture(scope="module")
def pairs(byte_tokenizer):
    return [make_pair(byte_tokenizer, index) for index in range(1, 5)]


def tiny_llama(tokenizer, seed: int = 0):
    return tiny_byte_llama(tokenizer, seed)


def policy_and_reference(tokenizer):
    """A reference and a policy moved away from it (rewards and gates not all at their step-0 values)."""
    policy = tiny_llama(tokenizer)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return policy.train(), reference


def preference_step(loss: dict, policy, reference, tokenizer) -> PreferenceStep:
    cfg = OmegaConf.create(
        {"loss": loss, "trainer": trainer_node(max_steps=MAX_STEPS, logp_chunk_size=7, logp_keep_mb=0.0)}
    )
    return PreferenceStep(cfg, policy, reference, torch.device("cpu"), tokenizer.pad_token_id)


def hand_gradient(step_fn: PreferenceStep, pairs, gate, detached: str | None) -> torch.Tensor:
    """The gradient of the loss by .backward() on a fresh forward, with the policy's `detached` side ("chosen",
    "rejected" or None) detached: one flat float64 vector over the trainable parameters."""
    policy = step_fn.policy
    parameters = trainable_parameters(policy)
    policy.zero_grad(set_to_none=True)
    batch = step_fn.layout.build(pair_groups(pairs), step_fn.pad_token_id)
    token = sequence_logps(policy, batch, chunk_size=5)
    chosen, rejected = split_pairs(token.summed)
    chosen_tokens, rejected_tokens = split_pairs(token.logps)
    chosen_mask, rejected_mask = split_pairs(token.mask)
    chosen_lengths, rejected_lengths = split_pairs(token.lengths)
    if detached == "chosen":
        chosen, chosen_tokens = chosen.detach(), chosen_tokens.detach()
    if detached == "rejected":
        rejected, rejected_tokens = rejected.detach(), rejected_tokens.detach()
    reference_chosen, reference_rejected = (
        step_fn.reference.logps(pairs, batch)[:2] if step_fn.reference is not None else (None, None)
    )
    out = preference_loss(
        step_fn.loss_name,
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        reference_chosen_logps=reference_chosen,
        reference_rejected_logps=reference_rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        chosen_token_logps=chosen_tokens,
        chosen_mask=chosen_mask,
        rejected_token_logps=rejected_tokens,
        rejected_mask=rejected_mask,
        gate=gate,
        progress=STEP / MAX_STEPS,
        **step_fn.hyperparameters,
    )
    out.loss.backward()
    flat = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
            for p in parameters  # a parameter the loss never reached has a zero gradient
        ]
    )
    policy.zero_grad(set_to_none=True)
    return flat


def hand_metrics(step_fn: PreferenceStep, pairs) -> dict[str, float]:
    """Every metric from separate backward passes: chosen side, rejected side ungated and gated, the whole loss."""
    policy = step_fn.policy
    policy.eval()
    try:
        chosen = hand_gradient(step_fn, pairs, None, detached="rejected")
        rejected = hand_gradient(step_fn, pairs, None, detached="chosen")
        gated = hand_gradient(step_fn, pairs, step_fn.gate, detached="chosen")
        whole = hand_gradient(step_fn, pairs, step_fn.gate, detached=None)
    finally:
        policy.train()
    # the chain rule, by hand: the whole loss's gradient is the sum of its two sides' (the gated one when gated)
    torch.testing.assert_close(whole, chosen + gated, rtol=1e-5, atol=1e-7 * float(whole.abs().max()))
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    return {
        "chosen_norm": float(chosen.norm()),
        "rejected_norm": float(rejected.norm()),
        "cos": cos(chosen, rejected),
        "total_norm": float(whole.norm()),
        "rejected_gated_norm": float(gated.norm()),
        "cos_gated": cos(chosen, gated),
        "gate_ratio": float(gated.norm() / rejected.norm()),
    }


def logged(metrics: dict[str, float]) -> dict[str, float]:
    return {key.removeprefix("dynamics/grad/"): value for key, value in metrics.items()}


GATE_SEQ = {"kind": "seq", "alpha": 50.0, "tau": 0.05}


@pytest.mark.parametrize(
    "loss",
    [
        pytest.param({"name": "dpo", "beta": 0.1, "gate": {"kind": "none"}}, id="dpo"),
        pytest.param({"name": "dpo", "beta": 0.1, "gate": GATE_SEQ}, id="gate_dpo-seq"),
        pytest.param({"name": "cal_dpo", "gate": {"kind": "q10", "alpha": 20.0, "tau": 0.01}}, id="cal_dpo-q10"),
        pytest.param({"name": "lpo", "gate": {"kind": "token", "alpha": 20.0, "tau": 0.01}}, id="lpo-token"),
        pytest.param({"name": "simpo", "gate": GATE_SEQ}, id="simpo-seq-reference_free"),
    ],
)
def test_each_metric_equals_separate_backward_passes(byte_tokenizer, pairs, loss):
    policy, reference_model = policy_and_reference(byte_tokenizer)
    from prefopt.losses import get_loss

    reference = ModelReference(reference_model, 64) if get_loss(loss["name"]).needs_reference else None
    step_fn = preference_step(loss, policy, reference, byte_tokenizer)
    # the run's gradient buffers hold something: the metrics must leave them as they are
    for parameter in policy.parameters():
        parameter.grad = torch.full_like(parameter, 0.25)
    metrics = logged(TermGradients(step_fn, pairs)(STEP))

    assert policy.training  # its mode restored
    assert all(bool((parameter.grad == 0.25).all()) for parameter in policy.parameters())
    policy.zero_grad(set_to_none=True)
    expected = hand_metrics(step_fn, pairs)
    gated = loss["gate"]["kind"] != "none"
    assert set(metrics) == set(GRAD_KEYS) | (set(GATED_KEYS) if gated else set())
    for key in metrics:
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert 0 < metrics["chosen_norm"] and 0 < metrics["rejected_norm"] and -1 <= metrics["cos"] <= 1
    if not gated:  # then the gated by-hand gradients are the ungated ones
        assert expected["gate_ratio"] == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize(
    "loss",
    [
        pytest.param({"name": "dpo", "beta": 0.1}, id="dpo"),
        pytest.param({"name": "ipo", "beta": 0.1}, id="ipo"),
        pytest.param({"name": "cal_dpo"}, id="cal_dpo"),
    ],
)
@pytest.mark.parametrize("kind", ["seq", "token"])
def test_a_gate_equal_for_every_pair_scales_the_rejected_gradient_by_it(byte_tokenizer, pairs, loss, kind):
    # alpha = 0: g = sigmoid(0) = 1/2 for every pair (seq) and every rejected token (token), whatever the log-probs
    policy, reference_model = policy_and_reference(byte_tokenizer)
    gate = {"kind": kind, "alpha": 0.0, "tau": 0.05}
    step_fn = preference_step(loss | {"gate": gate}, policy, ModelReference(reference_model, 64), byte_tokenizer)
    metrics = logged(TermGradients(step_fn, pairs)(STEP))
    assert metrics["rejected_gated_norm"] == pytest.approx(0.5 * metrics["rejected_norm"], rel=1e-5)
    assert metrics["gate_ratio"] == pytest.approx(0.5, rel=1e-5)
    assert metrics["cos_gated"] == pytest.approx(metrics["cos"], rel=1e-5)


def test_lora_norms_cover_the_adapters_only(byte_tokenizer, pairs):
    from prefopt.model.loading import apply_lora

    base = tiny_llama(byte_tokenizer)
    lora_cfg = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    policy = apply_lora(base, lora_cfg)
    with torch.no_grad():  # B starts at 0: move the adapters so both A and B get a gradient
        for name, parameter in policy.named_parameters():
            if "lora_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    trainable = [name for name, parameter in policy.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    reference = ModelReference(policy, 64, adapters_off=True)
    step_fn = preference_step({"name": "dpo", "beta": 0.1, "gate": GATE_SEQ}, policy, reference, byte_tokenizer)
    metrics = logged(TermGradients(step_fn, pairs)(STEP))
    expected = hand_metrics(step_fn, pairs)  # over requires_grad parameters: the adapters
    for key in metrics:
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert all(parameter.grad is None for parameter in policy.parameters())


@pytest.mark.parametrize("kind", ["seq", "q10", "token"])
def test_the_gate_never_reaches_the_chosen_side(byte_tokenizer, pairs, kind):
    # PreferenceStep.loss(grad_through="chosen") detaches every rejected input, the per-token ones the gates read too
    policy, reference_model = policy_and_reference(byte_tokenizer)
    gate = {"kind": kind, "alpha": 20.0, "tau": 0.01}
    step_fn = preference_step(
        {"name": "dpo", "gate": gate}, policy, ModelReference(reference_model, 64), byte_tokenizer
    )
    logps = step_fn.logps(pairs)
    parameters = trainable_parameters(policy)
    gated, ungated = (
        torch.autograd.grad(
            step_fn.loss(logps, STEP, gated=on, grad_through="chosen").loss, parameters, retain_graph=True
        )
        for on in (True, False)
    )
    for with_gate, without in zip(gated, ungated):
        torch.testing.assert_close(with_gate, without, rtol=1e-6, atol=0)


def test_the_fixed_batch_is_seeded_and_leaves_torch_generators_alone():
    train_pairs = [f"pair {index}" for index in range(20)]  # stand-ins: the draw reads only the list
    torch_state = torch.get_rng_state()
    first = term_gradient_pairs(train_pairs, 8, seed=3)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert first == [train_pairs[index] for index in random.Random(3).sample(range(20), 8)]
    assert first == term_gradient_pairs(train_pairs, 8, seed=3) != term_gradient_pairs(train_pairs, 8, seed=4)
    assert sorted(term_gradient_pairs(train_pairs[:5], 8, seed=3)) == sorted(train_pairs[:5])  # fewer: all of them


def test_a_loss_without_rejected_term_has_a_zero_rejected_gradient(byte_tokenizer, pairs):
    policy, _ = policy_and_reference(byte_tokenizer)
    step_fn = preference_step({"name": "sft"}, policy, None, byte_tokenizer)
    metrics = logged(TermGradients(step_fn, pairs)(STEP))
    policy.eval()
    chosen = hand_gradient(step_fn, pairs, None, detached="rejected")
    assert metrics["rejected_norm"] == 0.0 and math.isnan(metrics["cos"])
    assert metrics["chosen_norm"] == pytest.approx(float(chosen.norm()), rel=1e-5)
    assert metrics["total_norm"] == pytest.approx(metrics["chosen_norm"], rel=1e-6)


COMMON = [
    *TINY,
    "loss=gate_dpo",
    "trainer.max_steps=4",
    "trainer.save_every=2",
    "dynamics.every_n_steps=2",
    "dynamics.num_probes=3",
    "dynamics.term_grads_pairs=4",
    "logger.wandb.mode=disabled",
    "trainer.greedy_eval_examples=0",
]
TIMING = ("train/tokens_per_s", "train/tflops", "train/mfu")  # wall-clock dependent


def test_a_run_logs_them_at_every_probe_step_and_trains_as_without(tmp_path):
    on = run_train(tmp_path / "on", *COMMON, "dynamics.term_grads=true")
    off = run_train(tmp_path / "off", *COMMON)
    assert_same_training(on, off)  # training (and evaluation) exactly as without the feature
    assert any("train/loss" in row for row in read_jsonl(on / "metrics.jsonl"))

    dynamics_on, dynamics_off = read_jsonl(on / "dynamics.jsonl"), read_jsonl(off / "dynamics.jsonl")
    assert [row["step"] for row in dynamics_on] == [0, 2, 4]  # step 0, every_n_steps, the final step
    for row_on, row_off in zip(dynamics_on, dynamics_off):
        grads = {key: value for key, value in row_on.items() if key.startswith("dynamics/grad/")}
        assert set(grads) == {f"dynamics/grad/{key}" for key in GRAD_KEYS + GATED_KEYS}
        assert all(math.isfinite(value) for value in grads.values())
        assert {k: v for k, v in row_on.items() if k not in grads} == row_off  # the probes themselves unchanged
    assert dynamics_on[0]["dynamics/grad/gate_ratio"] < 1  # tiny random model: improbable rejected responses
    assert (on / "dynamics.png").is_file()

    # a resumed run computes the same batch: its last probe step's gradients are the uninterrupted run's
    resumed = run_train(tmp_path / "resumed", *COMMON, "dynamics.term_grads=true", "trainer.stop_after=2")
    run_train(resumed, *COMMON, "dynamics.term_grads=true", "trainer.resume=true")
    final_resumed, final_on = read_jsonl(resumed / "dynamics.jsonl")[-1], dynamics_on[-1]
    assert final_resumed["step"] == 4
    for key in (f"dynamics/grad/{key}" for key in GRAD_KEYS + GATED_KEYS):
        assert final_resumed[key] == pytest.approx(final_on[key], rel=1e-5), key


def test_a_lora_run_logs_them(tmp_path):
    run_dir = run_train(tmp_path / "lora", *COMMON, "model.lora.enabled=true", "dynamics.term_grads=true")
    rows = read_jsonl(run_dir / "dynamics.jsonl")
    assert [row["step"] for row in rows] == [0, 2, 4]
    # B starts at zero: at step 0 only B gets a gradient; both sides are non-zero and finite throughout
    assert all(row["dynamics/grad/chosen_norm"] > 0 and row["dynamics/grad/rejected_norm"] > 0 for row in rows)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["dynamics.term_grads=true", "dynamics.enabled=false"], "dynamics.term_grads=true needs dynamics.enabled"),
        (["dynamics.term_grads=true", "hardware=cpu_2proc", "hardware.zero_stage=3"], "ZeRO-3"),
        (["dynamics.term_grads=true", "trainer.compile=true", "hardware=cpu"], "trainer.compile=true"),
        (["dynamics.term_grads_pairs=0"], "dynamics.term_grads_pairs"),
    ],
)
def test_refused_configs(overrides, match):
    from prefopt.run.config import validate_config

    with pytest.raises(ConfigError, match=match):
        validate_config(compose_config(overrides))


def test_accepted_configs():
    from prefopt.run.config import validate_config

    validate_config(compose_config(["dynamics.term_grads=true", "hardware=cpu_2proc", "hardware.zero_stage=2"]))
    validate_config(compose_config(["dynamics.enabled=false"]))  # off by default: no need for probes


def assert_same_training(first, second) -> None:
    """metrics.jsonl of two runs equal line by line, wall-clock keys aside."""
    rows_first, rows_second = read_jsonl(first / "metrics.jsonl"), read_jsonl(second / "metrics.jsonl")
    assert [row["step"] for row in rows_first] == [row["step"] for row in rows_second]
    for row_first, row_second in zip(rows_first, rows_second):
        assert {k: v for k, v in row_first.items() if k not in TIMING} == {
            k: v for k, v in row_second.items() if k not in TIMING
        }


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2])  # ZeRO-2 partitions gradients and optimizer state (0 passed too: CI time)
def test_two_deepspeed_ranks_log_the_single_process_values_and_train_as_without(tmp_path, zero_stage):
    # two ranks of one pair each draw what one process draws as a micro batch of two: the same run, step by step
    two_ranks = [*COMMON, "hardware=cpu_2proc", f"hardware.zero_stage={zero_stage}", "trainer.micro_batch_size=1"]
    on = run_train(tmp_path / "on", *two_ranks, "dynamics.term_grads=true")
    off = run_train(tmp_path / "off", *two_ranks)
    assert_same_training(on, off)
    single = run_train(tmp_path / "single", *COMMON, "dynamics.term_grads=true")
    rows, expected = read_jsonl(on / "dynamics.jsonl"), read_jsonl(single / "dynamics.jsonl")
    assert [row["step"] for row in rows] == [row["step"] for row in expected] == [0, 2, 4]
    for row, want in zip(rows, expected):
        for key in (f"dynamics/grad/{key}" for key in GRAD_KEYS + GATED_KEYS):
            assert row[key] == pytest.approx(want[key], rel=1e-5), (row["step"], key)
