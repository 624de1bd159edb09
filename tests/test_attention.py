"""Attention by pieces (model/attention.py) gives the padded path's numbers, in value (1e-5) and in gradient
(1e-4), for Llama, Qwen2, Gemma-2 (soft-capped attention logits, sliding window), Cohere and Granite
(attention multiplier), with windows short enough that they cut into the sequences; the dense packed mask
cannot hold a window that only some layers use, so it is refused for such models (and shown wrong)."""

from __future__ import annotations

import pytest
import torch
import transformers

from prefopt.core.errors import ConfigError
from prefopt.data.layout import PADDED, AttentionPieces, BatchLayout, build_batch, row_budget
from prefopt.model.attention import (
    PIECES_ATTENTION,
    attention_implementation,
    checkpoint_context,
    pieces_attention,
    pieces_attention_forward,
)
from prefopt.model.logps import check_packed_path, sequence_logps, sliding_window_layers
from tests.test_logps_models import SHAPE, VOCAB
from tests.test_packing import groups_of

WINDOW = 5  # shorter than every segment below: a layer that ignored it would see too much


def windowed_model(kind: str, attn_implementation: str = "sdpa"):
    """A tiny model of each family with what its attention does beyond plain causal softmax switched on."""
    if kind == "llama":
        config = transformers.LlamaConfig(**SHAPE)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(
            **SHAPE,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=0,
            layer_types=["sliding_attention", "full_attention"],
        )
    elif kind == "gemma2":
        config = transformers.Gemma2Config(
            **SHAPE, head_dim=8, sliding_window=WINDOW, attn_logit_softcapping=3.0, final_logit_softcapping=10.0
        )
        attn_implementation = "eager"  # soft-capped attention logits: SDPA cannot express them
    elif kind == "cohere":
        config = transformers.CohereConfig(**SHAPE, logit_scale=0.5)
    elif kind == "granite":
        config = transformers.GraniteConfig(**SHAPE, attention_multiplier=0.3, logits_scaling=2.0)
    else:
        raise ValueError(kind)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # sharper logits, so a wrong attention shows
        model.get_output_embeddings().weight.mul_(10.0)
    return model.eval()


KINDS = ["llama", "qwen2", "gemma2", "cohere", "granite"]
LENGTHS = [(9, [7, 11]), (4, [3, 8]), (6, [1, 5]), (5, [2, 3])]  # prompt, responses: pieces of length 1 included


def logps_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = sequence_logps(model, batch, chunk_size=4, with_stats=True)
    out.summed.sum().backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return out, grads


def assert_pieces_equal_padded(model, groups, pieces_batch=None):
    """Log-probs (and their stats) to 1e-5 and every parameter's gradient to 1e-4, pieces against padded rows."""
    pieces_batch = pieces_batch or BatchLayout("packed", None, "pieces").build(groups, 0)
    packed, packed_grads = logps_and_grads(model, pieces_batch)
    padded, padded_grads = logps_and_grads(model, PADDED.build(groups, 0))
    for name in ("logps", "mask", "max_logps", "entropy"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), rtol=1e-5, atol=1e-5)
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("row_tokens", [None, 20], ids=["one-row", "several-padded-rows"])
@pytest.mark.parametrize("kind", KINDS)
def test_pieces_equal_padded_in_value_and_gradient(kind, row_tokens):
    model = windowed_model(kind)
    groups = groups_of(LENGTHS, seed=4)
    pieces_batch = BatchLayout("packed", row_tokens, "pieces").build(groups, 0)
    assert pieces_batch.attention_mask is None and pieces_batch.pieces is not None
    assert pieces_batch.input_ids.shape == ((1, 64) if row_tokens is None else (3, 27))  # 27 | 15+12 | 10: padding
    assert_pieces_equal_padded(model, groups, pieces_batch)
    assert check_packed_path(model, VOCAB, "cpu", BatchLayout("packed", None, "pieces")) < 1e-4


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_pieces_under_gradient_checkpointing_recompute_the_same_attention(kind):
    """Checkpointed layers recompute in backward, after pieces_attention() has exited: they must attend by pieces
    again (checkpoint_context), as model.gradient_checkpointing=true sets them up (model/loading.py)."""
    model = windowed_model(kind).train()
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context(model.config)}
    )
    assert_pieces_equal_padded(model, groups_of(LENGTHS, seed=4))


@pytest.mark.parametrize("kind", ["qwen2", "gemma2"])
def test_dense_packing_is_wrong_under_a_sliding_window_and_refused(kind):
    model = windowed_model(kind)
    assert sliding_window_layers(model.config) == WINDOW
    groups = groups_of(LENGTHS, seed=4)
    with torch.no_grad():
        dense = sequence_logps(model, build_batch(groups, 0, "packed", 10**6, "dense"), chunk_size=4).summed
        padded = sequence_logps(model, PADDED.build(groups, 0), chunk_size=4).summed
    assert (dense - padded).abs().max() > 1e-3  # why it is refused: one mask for every layer
    with pytest.raises(ConfigError, match="sliding-window.*trainer.attention=pieces"):
        check_packed_path(model, VOCAB, "cpu", BatchLayout("packed", None, "dense"))


def test_models_without_a_window_in_use_are_not_refused():
    assert sliding_window_layers(transformers.Qwen2Config(**SHAPE)) is None  # window set, use_sliding_window off
    assert sliding_window_layers(transformers.LlamaConfig(**SHAPE)) is None
    assert sliding_window_layers(transformers.Gemma2Config(**SHAPE, head_dim=8)) == 4096


def test_the_plan_covers_each_row_in_order_and_builds_no_dense_mask():
    groups = groups_of([(3, [2, 4]), (5, [1, 1])])
    batch = build_batch(groups, 0, "packed", None, "pieces")
    assert batch.input_ids.shape == (1, 16) and batch.real_tokens == 16  # one row, no padding
    # (row, query start, query end, prefix start, prefix end): the longest group first (first fit)
    assert batch.pieces.pieces == (
        (0, 0, 3, 0, 0),
        (0, 3, 5, 0, 3),
        (0, 5, 9, 0, 3),
        (0, 9, 14, 9, 9),
        (0, 14, 15, 9, 14),
        (0, 15, 16, 9, 14),
    )
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 5]


def test_row_budget_follows_the_attention_path():
    assert row_budget([120, 300, 80], "pieces") == 0  # one row: a row's width costs pieces nothing
    assert row_budget([120, 300, 80], "dense") == 300  # no row wider than the longest segment
    dense = build_batch(groups_of([(10, [5, 5])] * 3 + [(30, [10, 10])]), 0, "packed", None, "dense")
    assert dense.input_ids.shape == (3, 50)  # budget 50: the 50-token segment, 20 + 20, 20


def test_the_configured_attention_is_restored_even_when_the_forward_fails():
    model = windowed_model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with pieces_attention(model):
            assert model.config._attn_implementation == PIECES_ATTENTION
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_pieces_attention_without_a_plan_is_loud():
    model = windowed_model("llama")
    with pytest.raises(RuntimeError, match="without a piece plan"):
        with pieces_attention(model):
            model(input_ids=torch.tensor([[1, 2, 3]]))


def test_a_model_that_ignores_the_attention_interface_is_refused():
    """A model whose attention does not go through transformers' AttentionInterface never sees the plan: it
    attends the whole packed row, and check_packed_path refuses it before a step runs."""
    model = windowed_model("llama")
    for layer in model.model.layers:
        attention = layer.self_attn
        original = attention.forward

        def everything_visible(hidden_states, *args, _original=original, **kwargs):
            kwargs.pop("attention_pieces", None)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                model.config._attn_implementation = "sdpa"  # as if hard-wired to its own SDPA, no mask
                try:
                    return _original(hidden_states, *args, **kwargs)
                finally:
                    model.config._attn_implementation = PIECES_ATTENTION

        attention.forward = everything_visible
    with pytest.raises(ConfigError, match="does not take prefix-shared"):
        check_packed_path(model, VOCAB, "cpu", BatchLayout("packed", None, "pieces"))


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_the_cuda_mask_form_gives_the_same_numbers(kind, monkeypatch):
    """On CUDA a window-less response piece is attended with torch's CausalBias (bottom-right causal, which the
    flash kernels take) instead of a boolean mask; forced here on the CPU, it gives the same numbers."""
    masks = AttentionPieces.masks
    monkeypatch.setattr(
        AttentionPieces, "masks", lambda self, window, device, lower_right_bias=False: masks(self, window, device, True)
    )
    model = windowed_model(kind)
    assert_pieces_equal_padded(model, groups_of(LENGTHS, seed=4))


def test_a_window_kept_on_the_module_is_applied():
    """Qwen2-MoE and PhiMoE keep their window on the attention module and do not pass it to the call."""
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    plan = build_batch(groups_of([(7, [5])]), 0, "packed", None, "pieces").pieces
    module = torch.nn.Module()
    passed, _ = pieces_attention_forward(module, query, key, value, None, sliding_window=3, attention_pieces=plan)
    module.sliding_window = 3
    kept, _ = pieces_attention_forward(module, query, key, value, None, attention_pieces=plan)
    del module.sliding_window
    unwindowed, _ = pieces_attention_forward(module, query, key, value, None, attention_pieces=plan)
    torch.testing.assert_close(kept, passed)
    assert (unwindowed - passed).abs().max() > 1e-3
    assert plan.windows_seen == {3, None}


def test_a_model_whose_window_never_reaches_its_attention_is_refused():
    model = windowed_model("qwen2")
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None  # as if the layer applied its window only through a dense mask
    with pytest.raises(ConfigError, match="never pass"):
        check_packed_path(model, VOCAB, "cpu", BatchLayout("packed", None, "pieces"))


def test_a_plan_the_attention_would_misread_is_refused():
    with pytest.raises(ValueError, match="not contiguous"):
        AttentionPieces(((0, 0, 3, 0, 0), (0, 4, 6, 0, 3)), rows=1, width=6)  # a gap
    with pytest.raises(ValueError, match="not contiguous"):
        AttentionPieces(((0, 0, 3, 0, 0), (0, 3, 6, 0, 2)), rows=1, width=6)  # a prefix that is no prompt piece
    with pytest.raises(ValueError, match="past the width"):
        AttentionPieces(((0, 0, 3, 0, 0), (0, 3, 8, 0, 3)), rows=1, width=6)


def test_the_sub_configs_keep_their_own_attention():
    config = transformers.AutoConfig.for_model("llava")  # a text_config and a vision_config
    config.vision_config._attn_implementation = "eager"
    config.text_config._attn_implementation = "sdpa"
    with attention_implementation(config, PIECES_ATTENTION):
        assert config.text_config._attn_implementation == PIECES_ATTENTION
    assert (config.vision_config._attn_implementation, config.text_config._attn_implementation) == ("eager", "sdpa")
