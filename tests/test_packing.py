"""Prefix sharing and packing give the padded path's numbers: the layout is a data/ decision, invisible to
the trainer. Checked on the masks themselves, on five model families, and end to end through training
(first 5 steps' losses and log-probs to 1e-4 relative) for dpo, gate_dpo (token gate), lpo, simpo and orpo."""

from __future__ import annotations

import pytest
import torch

from prefopt.core.errors import ConfigError
from prefopt.data.layout import BatchLayout, build_batch
from prefopt.model.logps import check_packed_path, sequence_logps
from prefopt.observe.tracking import read_jsonl
from tests.helpers import run_train
from tests.test_logps_models import ARCHITECTURES, VOCAB, tiny_model


def groups_of(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    draw = lambda length: torch.randint(0, VOCAB, (length,), generator=generator).tolist()  # noqa: E731
    groups, index = [], 0
    for prompt_length, response_lengths in lengths:
        responses = []
        for length in response_lengths:
            responses.append((index, draw(length)))
            index += 1
        groups.append((draw(prompt_length), responses))
    return groups


def test_the_packed_mask_shares_the_prompt_and_hides_the_other_responses():
    groups = groups_of([(3, [2, 2])])
    batch = build_batch(groups, 0, "packed", 100, "dense")
    attend = batch.attention_mask[0, 0]
    prompt, first, second = range(0, 3), range(3, 5), range(5, 7)
    assert all(attend[i, j] for i in second for j in prompt)  # the second response sees the prompt
    assert not any(attend[i, j] for i in second for j in first)  # but never the first response
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4]  # positions continue from the prompt's end
    # both responses' first token is scored from the prompt's last position
    assert batch.predictor_cols.tolist() == [2, 3, 2, 5] and batch.token_index.tolist() == [0, 1, 0, 1]


def test_rows_are_filled_up_to_the_budget_and_padding_is_small():
    groups = groups_of([(10, [5, 5])] * 6)  # 20 tokens per group
    batch = build_batch(groups, 0, "packed", 64)
    assert batch.input_ids.shape == (2, 60)  # 3 groups per row
    assert batch.real_tokens == 120
    padded = build_batch(groups, 0, "padded")
    assert padded.input_ids.shape == (12, 15) and padded.real_tokens == 180  # prompts twice


@pytest.mark.parametrize("attention", ["pieces", "dense"])
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_packed_equals_padded_for_each_model_family_in_value_and_gradient(kind, attention):
    model = tiny_model(kind)
    groups = groups_of([(6, [4, 5]), (3, [2, 6]), (8, [3, 1])], seed=3)
    layout = BatchLayout("packed", 24, attention)
    packed = sequence_logps(model, layout.build(groups, 0), chunk_size=4, with_stats=True)
    padded = sequence_logps(model, build_batch(groups, 0, "padded"), chunk_size=4, with_stats=True)
    for name in ("logps", "mask", "max_logps", "entropy"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), rtol=1e-5, atol=1e-5)
    weights = [p for p in model.parameters() if p.requires_grad]
    packed_grads = torch.autograd.grad(packed.summed.sum(), weights, allow_unused=True)
    padded_grads = torch.autograd.grad(padded.summed.sum(), weights, allow_unused=True)
    for a, b in zip(packed_grads, padded_grads):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if attention == "dense" and kind == "gemma2":  # sliding-window layers: one dense mask cannot serve them all
        with pytest.raises(ConfigError, match="sliding-window"):
            check_packed_path(model, VOCAB, "cpu", layout)
    else:
        assert check_packed_path(model, VOCAB, "cpu", layout) < 1e-4


TINY = [
    "model=tiny_llama",
    "trainer.eval_batch_size=4",
    "trainer.lr=1e-3",
    "dataset.arith.num_train=32",
    "dataset.arith.num_eval=4",
    "trainer.greedy_eval_examples=0",
    "dynamics.num_probes=3",
    "trainer.warmup_steps=0",
    "trainer.max_steps=5",
    "trainer.micro_batch_size=4",
    "logger.wandb.mode=disabled",
    "trainer.save_final=false",
    "trainer.packed_row_tokens=96",
]
# lpo: its regularizer relu(ref_chosen - policy_chosen) has its kink exactly where step 1 starts (policy ==
# reference); a precomputed reference, scored in other batches, differs there by float rounding (~1e-7), which
# picks a side of the kink at random in either layout. A reference model scoring the same batch is exact there.
LOSSES = [
    ["loss=dpo"],
    ["loss=gate_dpo", "loss.gate.kind=token"],
    ["loss=lpo", "reference.precompute=false"],
    ["loss=simpo"],
    ["loss=orpo"],
]
KEYS = ("train/loss", "train/logps/chosen", "train/logps/rejected")


def assert_layouts_agree(tmp_path, *overrides):
    runs = {
        layout: run_train(tmp_path / layout, *TINY, *overrides, f"trainer.batching={layout}")
        for layout in ("padded", "packed")
    }
    rows = {
        layout: [row for row in read_jsonl(run / "metrics.jsonl") if "train/loss" in row]
        for layout, run in runs.items()
    }
    assert len(rows["packed"]) == len(rows["padded"]) == 5
    for packed, padded in zip(rows["packed"], rows["padded"]):
        for key in KEYS:
            assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-6), (packed["step"], key)
    probes = {layout: read_jsonl(run / "dynamics.jsonl")[-1] for layout, run in runs.items()}
    for key in ("dynamics/chosen/logp", "dynamics/others/logp", "dynamics/greedy/logp", "dynamics/mass/entropy"):
        assert probes["packed"][key] == pytest.approx(probes["padded"][key], rel=1e-4), key


@pytest.mark.parametrize("loss", LOSSES, ids=lambda overrides: "-".join(o.split("=")[1] for o in overrides))
def test_packed_training_matches_padded_torch_engine(tmp_path, loss):
    assert_layouts_agree(tmp_path, *loss, "hardware=cpu")


def test_packed_training_matches_padded_with_gradient_checkpointing(tmp_path):
    """Checkpointed layers recompute in backward, outside the forward's attention by pieces (checkpoint_context)."""
    assert_layouts_agree(tmp_path, "loss=dpo", "hardware=cpu", "model.gradient_checkpointing=true")


def test_dense_packed_training_matches_padded(tmp_path):
    """The dense masked path stays the reference the pieces are measured against."""
    assert_layouts_agree(tmp_path, "loss=dpo", "hardware=cpu", "trainer.attention=dense")


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES, ids=lambda overrides: "-".join(o.split("=")[1] for o in overrides))
def test_packed_training_matches_padded_two_ranks(tmp_path, loss):
    assert_layouts_agree(tmp_path, *loss, "hardware=cpu_2proc", "trainer.micro_batch_size=2")


def test_packed_training_matches_padded_with_lora(tmp_path):
    assert_layouts_agree(
        tmp_path, "loss=dpo", "hardware=cpu", "model.lora.enabled=true", "model.lora.r=4", "trainer.lr=1e-2"
    )
