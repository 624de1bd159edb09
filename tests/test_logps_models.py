"""The log-probs are the model's own: response_token_logps == log_softmax(model(...).logits) at the
labelled positions, in value and in gradient, for architectures that post-process their logits
(Gemma-2 soft-capping, Cohere logit_scale, Granite logits_scaling) and for plain ones."""

from __future__ import annotations

import pytest
import torch

from prefopt.data import IGNORE_INDEX
from prefopt.model.logps import (
    LogitsPathError,
    check_logits_path,
    kept_logps_bytes,
    labelled_rows_batch,
    response_token_logps,
    sequence_logps,
)

VOCAB = 97
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
)


def tiny_model(kind: str):
    import transformers

    if kind == "llama":
        config = transformers.LlamaConfig(**SHAPE)
        model_class = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**SHAPE)
        model_class = transformers.Qwen2ForCausalLM
    elif kind == "gemma2":
        config = transformers.Gemma2Config(**SHAPE, head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=5.0)
        model_class = transformers.Gemma2ForCausalLM
    elif kind == "cohere":
        config = transformers.CohereConfig(**SHAPE, logit_scale=0.3)
        model_class = transformers.CohereForCausalLM
    elif kind == "granite":
        config = transformers.GraniteConfig(**SHAPE, logits_scaling=4.0)
        model_class = transformers.GraniteForCausalLM
    else:
        raise ValueError(kind)
    config._attn_implementation = "eager"  # gemma2's soft-capped attention needs eager; eager for all keeps it simple
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():  # random heads give near-uniform logits; scale them up so soft-capping and scaling matter
        model.get_output_embeddings().weight.mul_(20.0)
    return model.float()


def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, 17), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 11:] = 0  # a right-padded row
    labels = input_ids.clone()
    labels[:, :6] = IGNORE_INDEX  # prompt
    labels[attention_mask == 0] = IGNORE_INDEX
    return input_ids, attention_mask, labels


def direct_logps(model, input_ids, attention_mask, labels):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(-1)


ARCHITECTURES = ["llama", "qwen2", "gemma2", "cohere", "granite"]


@pytest.mark.parametrize("keep_logps_mb", [0.0, 1024.0], ids=["head-recomputed", "logps-kept"])
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_logps_equal_the_models_own_logits_in_value_and_gradient(kind, keep_logps_mb):
    model = tiny_model(kind)
    input_ids, attention_mask, labels = batch()
    ours = response_token_logps(
        model, input_ids, attention_mask, labels, chunk_size=4, keep_logps_mb=keep_logps_mb
    ).summed
    our_grads = torch.autograd.grad(ours.sum(), list(model.parameters()), allow_unused=True)
    expected = direct_logps(model, input_ids, attention_mask, labels)
    expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for ours_grad, expected_grad in zip(our_grads, expected_grads):
        if expected_grad is None:
            continue
        torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-4, atol=1e-5)
    assert check_logits_path(model, VOCAB, "cpu") < 1e-5


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_post_processing_matters_for_these_models(kind):
    """Without the post-processing the head's raw log-probs differ: the cases above are not vacuous."""
    model = tiny_model(kind)
    input_ids, attention_mask, labels = batch()
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    raw = torch.log_softmax(model.get_output_embeddings()(hidden).float(), -1)
    targets = labels[:, 1:]
    raw_logps = (raw.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != IGNORE_INDEX)).sum(-1)
    expected = direct_logps(model, input_ids, attention_mask, labels)
    assert (raw_logps - expected).abs().max() > 0.1


def test_the_head_runs_only_on_scored_positions():
    model = tiny_model("llama")
    input_ids, attention_mask, labels = batch()
    seen_rows = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: seen_rows.append(args[0].shape)
    )
    try:
        response_token_logps(model, input_ids, attention_mask, labels, chunk_size=1000)
    finally:
        handle.remove()
    scored = int((labels[:, 1:] != IGNORE_INDEX).sum())
    # the intercepted call inside the model's forward returns a placeholder; the real projection sees scored positions
    # only
    assert [shape[0] for shape in seen_rows if len(shape) == 2] == [scored]


def head_projections_in_a_training_pass(model, keep_logps_mb: float, chunk_size: int, min_scored_tokens: int = 0):
    """(projections the head ran, forward and backward together; the parameters' gradients)."""
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: calls.append(args[0].dim())
    )
    try:
        summed = sequence_logps(
            model,
            labelled_rows_batch(*batch()),
            chunk_size,
            keep_logps_mb=keep_logps_mb,
            min_scored_tokens=min_scored_tokens,
        ).summed
        grads = torch.autograd.grad(summed.sum(), [p for p in model.parameters()], allow_unused=True)
    finally:
        handle.remove()
    return calls.count(2), grads  # 3-D calls are the intercepted one inside the model's forward


def test_the_head_runs_once_per_chunk_when_the_log_probs_fit_the_budget_and_twice_past_it():
    """trainer.logp_keep_mb: kept log-probs spare the backward recompute of the head, with the same gradients."""
    model = tiny_model("gemma2")  # post-processed logits: the soft-cap's saved tensors count against the budget too
    scored = int((batch()[2][:, 1:] != IGNORE_INDEX).sum())
    chunks = -(-scored // 4)
    needed_mb = kept_logps_bytes(scored, VOCAB, postprocessed=True) / 2**20
    kept_calls, kept_grads = head_projections_in_a_training_pass(model, keep_logps_mb=needed_mb, chunk_size=4)
    recomputed_calls, recomputed_grads = head_projections_in_a_training_pass(
        model, keep_logps_mb=needed_mb * 0.99, chunk_size=4
    )
    assert (kept_calls, recomputed_calls) == (chunks, 2 * chunks)
    for kept, recomputed in zip(kept_grads, recomputed_grads):
        if kept is not None:
            torch.testing.assert_close(kept, recomputed, rtol=0, atol=0)


def test_ranks_take_the_same_recompute_decision_from_the_peer_token_count():
    """Under ZeRO-3 a head call gathers its weight collectively: a rank scoring fewer tokens must still
    recompute exactly when its peer does, so the decision reads min_scored_tokens (the peers' largest)."""
    model = tiny_model("llama")
    scored = int((batch()[2][:, 1:] != IGNORE_INDEX).sum())
    budget_mb = kept_logps_bytes(scored, VOCAB, postprocessed=False) / 2**20
    alone, _ = head_projections_in_a_training_pass(model, budget_mb, chunk_size=scored)
    beside_a_larger_peer, _ = head_projections_in_a_training_pass(
        model, budget_mb, chunk_size=scored, min_scored_tokens=scored + 1
    )
    assert alone == 1  # fits: one chunk, kept
    assert beside_a_larger_peer == 2 * 2  # the peer is over budget: recompute, and pad to its two chunks


def test_an_unknown_logit_post_processing_is_refused():
    model = tiny_model("llama")
    original_forward = model.forward

    def forward_with_unknown_scaling(*args, **kwargs):
        output = original_forward(*args, **kwargs)
        output.logits = output.logits * 3.0
        return output

    model.forward = forward_with_unknown_scaling
    with pytest.raises(LogitsPathError, match="post-processes logits"):
        check_logits_path(model, VOCAB, "cpu")
