"""Attention that computes only what a packed, prefix-shared mask keeps: one attention call per *piece*.

A packed row (data/layout.py) holds segments [prompt | response 1 | response 2 | ...]. Its dense mask is
block-diagonal and mostly False: every query of a 1,000-token row would score every key, though a segment
sees only its own few hundred tokens and a response never sees its sibling. Here each piece is one call:

  prompt     : queries = keys = the prompt, causal (the kernel skips the upper triangle);
  response k : queries = the response, keys = [prompt | response k], causal aligned to the bottom right
               (every prompt key, and the response's own keys up to the query).

So the work is sum(prompt^2 / 2 + response * (prompt + response / 2)) instead of rows * width^2, and no
mask of width^2 is ever built. The model's own code does everything else (projections, rotary, norms,
q/k-norms, output projection): this is a function registered in transformers' AttentionInterface, chosen
only for the duration of a forward that carries a piece plan (`pieces_attention`), so generation, the
logits check and every padded forward run the model's configured attention unchanged.

What a layer asks of its attention is honoured per piece: `scaling` (Granite's attention_multiplier,
Gemma-2's query_pre_attn_scalar), `sliding_window` (in position-id space, which a piece shares with the
padded layout), `softcap` (Gemma-2: computed in the eager formula, which SDPA cannot express), GQA and
dropout. tests/test_attention.py proves values and gradients equal the padded path for Llama, Qwen2,
Gemma-2, Cohere and Granite.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias
from transformers import AttentionInterface

from prefopt.data.layout import AttentionPieces

PIECES_ATTENTION = "prefopt_pieces"


def _piece_attention(query, key, value, mask, scaling, dropout, softcap, groups):
    """softmax(q k^T * scaling [soft-capped] + mask) v for one piece; (1, heads, queries, dim) in and out."""
    if softcap is None:
        if mask is not None and groups > 1 and query.is_cuda:  # CUDA: GQA with a mask falls back to the math kernel
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
            groups = 1
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=mask is None,
            scale=scaling,
            enable_gqa=groups > 1,
        )
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    elif isinstance(mask, CausalBias):
        mask = mask._materialize(scores.device)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, value)


def pieces_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (rows, heads, width, dim)
    key: torch.Tensor,  # (rows, kv_heads, width, dim)
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    attention_pieces: Optional[AttentionPieces] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; returns (rows, width, heads, dim) like its other functions."""
    if attention_pieces is None:
        raise RuntimeError(
            f"{PIECES_ATTENTION} attention was called without a piece plan: a forward under pieces_attention() "
            "must pass attention_pieces=..."
        )
    plan = attention_pieces
    if query.shape[0] != plan.rows or query.shape[2] != plan.width:
        raise RuntimeError(f"attention pieces planned for {plan.rows} x {plan.width}, called on {tuple(query.shape)}")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if sliding_window is None:  # some models (Qwen2-MoE, PhiMoE) keep the window on the module, not in the call
        sliding_window = getattr(module, "sliding_window", None)
    plan.windows_seen.add(sliding_window)  # check_packed_path: a model's window must reach its attention
    groups = query.shape[1] // key.shape[1]
    # CUDA: a window-less response piece as causal aligned to the bottom right, which flash kernels take
    masks = iter(plan.masks(sliding_window, query.device, lower_right_bias=query.is_cuda))
    # split, not slice: the backward of a split is one concatenation, where each slice's backward would fill a
    # zero tensor of the whole row and add into it (per piece, per layer)
    out = []
    for row, (row_query, row_key, row_value) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):
        sizes, prefixes = plan.row_chunks(row)
        padding = plan.width - sum(sizes)
        split = sizes + [padding] * (padding > 0)
        queries, keys, values = (tensor.split(split, dim=1) for tensor in (row_query, row_key, row_value))
        parts = []
        for index, prefix in enumerate(prefixes):
            k, v = keys[index], values[index]
            if prefix is not None:
                k, v = torch.cat((keys[prefix], k), dim=1), torch.cat((values[prefix], v), dim=1)
            attended = _piece_attention(
                queries[index].unsqueeze(0),
                k.unsqueeze(0),
                v.unsqueeze(0),
                next(masks),
                scaling,
                dropout,
                softcap,
                groups,
            )
            parts.append(attended.squeeze(0))
        if padding:  # attends to nothing, never scored
            parts.append(row_query.new_zeros(row_query.shape[0], padding, row_value.shape[-1]))
        out.append(torch.cat(parts, dim=1))
    return torch.stack(out).transpose(1, 2).contiguous(), None


# under trainer.compile (model/compile.py) the layers around it are compiled; this stays eager (a graph break), as
# its Python loop over the batch's pieces would recompile for every new batch
AttentionInterface.register(PIECES_ATTENTION, torch.compiler.disable(pieces_attention_forward, recursive=True))


@contextlib.contextmanager
def attention_implementation(config, name: str):
    """Inside, the model of `config` attends with `name`; its configured attention is restored after, on every
    sub-config as it was (the setter writes the new name into all of them)."""
    configs = [config] + [getattr(config, key) for key in config.sub_configs if getattr(config, key, None) is not None]
    configured = [each._attn_implementation for each in configs]
    config._attn_implementation = name
    try:
        yield
    finally:
        for each, implementation in zip(configs, configured):
            each._attn_implementation_internal = implementation


def pieces_attention(model):
    """Inside, the model's layers call pieces_attention_forward. The name is not one of transformers' mask
    functions, so the model builds no dense mask either."""
    return attention_implementation(model.config, PIECES_ATTENTION)


def checkpoint_context(config):
    """context_fn for torch.utils.checkpoint (model.gradient_checkpointing): a layer recomputed in backward attends
    as its forward did. The recomputation runs after pieces_attention() has exited, so without this it would
    attend the packed row with the configured attention and no mask: other numbers (torch refuses them)."""

    def context_fn():
        return contextlib.nullcontext(), attention_implementation(config, config._attn_implementation)

    return context_fn
