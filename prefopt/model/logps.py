"""Per-token and per-sequence log-probs of responses under a causal LM: the model's own logits,
computed only where something is scored. A packed batch with a piece plan runs its forward under attention by
pieces (model/attention.py); any other batch with its mask, under the model's configured attention.

The model runs its own root forward (`model(input_ids, attention_mask)`), so every architecture's
hidden-state path is its own and, under ZeRO-3, the root module's hooks (parameter prefetch
bookkeeping) run. The output head is intercepted inside that forward: it records the hidden states it
is given and returns a placeholder, so the model never projects prompt and padding positions onto the
vocabulary. The hidden states of the scored (labelled) positions are gathered and projected in chunks
of `chunk_size` positions. In a backward pass each chunk's fp32 log-probs are kept for its gradient when
all of them fit in `keep_logps_mb`, so the head runs once per token; past that budget each chunk runs under
activation checkpointing and its head is recomputed in backward, so no pass holds more than one chunk.

What a model does to its logits after the head (Gemma-2/3 final-logit soft-capping, Cohere's
`logit_scale`, Granite's `logits_scaling`) is applied from its config (`logit_postprocessor`), and
`check_logits_path` proves once per model, at build time, that the result equals
`log_softmax(model(...).logits)`: an architecture that post-processes logits some other way is
refused loudly instead of being trained on wrong log-probs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from prefopt.core.errors import ConfigError
from prefopt.data import IGNORE_INDEX
from prefopt.data.layout import PADDED, BatchLayout, SequenceBatch
from prefopt.model.attention import pieces_attention
from prefopt.model.precision import autocast, full_precision


class LogitsPathError(RuntimeError):
    """The model's logits are not what prefopt computes from its head (an unknown post-processing)."""


@dataclass
class TokenLogps:
    logps: torch.Tensor  # (N, T) log pi(y_t | x, y_<t) at response positions, 0 elsewhere
    mask: torch.Tensor  # (N, T) 1.0 on response positions
    max_logps: Optional[torch.Tensor] = None  # (N, T) max_v log pi(v | ...): the greedy token's log-prob
    entropy: Optional[torch.Tensor] = None  # (N, T) entropy of the next-token distribution
    argmax: Optional[torch.Tensor] = None  # (N, T) long: the greedy token argmax_v log pi(v | ...), 0 elsewhere
    mass: Optional[torch.Tensor] = None  # (mass_sequences, V) float64: row i sums pi(. | ...) over sequence i
    mean_logits: Optional[torch.Tensor] = (
        None  # (N, T) mean over the vocabulary of the (post-processed) logits, no gradient
    )
    # (N, H) float64, no gradient: the sum over each sequence's scored positions of the hidden state the output head
    # reads there (the last layer's, after the final norm), for CHES (train/inspection.py)
    hidden_sums: Optional[torch.Tensor] = None
    # (N, T) log sum_v pi(v | ...)^2 at each response position, no gradient: WPO's weights (losses/reweight.py)
    log_sum_sq: Optional[torch.Tensor] = None

    @property
    def summed(self) -> torch.Tensor:
        return self.logps.sum(-1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)


def _text_config(config):
    return getattr(config, "text_config", None) or config


def logit_postprocessor(config) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """What the architecture's forward does to `lm_head(hidden)` before returning logits, or None."""
    config = _text_config(config)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:  # Gemma-2, Gemma-3
        return lambda logits: torch.tanh(logits / softcap) * softcap
    scale = getattr(config, "logit_scale", None)
    if scale is not None and scale != 1.0:  # Cohere, Cohere2
        return lambda logits: logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None and divisor != 1.0:  # Granite, GraniteMoe
        return lambda logits: logits / divisor
    return None


def output_head(model) -> torch.nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise LogitsPathError(
            f"{type(model).__name__} has no output embedding (get_output_embeddings() is None): not a causal LM"
        )
    return head


@contextlib.contextmanager
def intercepted_head(head: torch.nn.Module):
    """Inside, calling `head` records its input and returns a (..., 1) placeholder instead of logits.

    The module is still called through __call__, so its hooks (ZeRO-3 gathering) behave as usual."""
    captured: dict[str, torch.Tensor] = {}
    previous = head.__dict__.get("forward")

    def record(hidden_states, *args, **kwargs):
        captured["hidden"] = hidden_states
        return hidden_states.new_zeros(hidden_states.shape[:-1] + (1,))

    head.forward = record
    try:
        yield captured
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def _chunk_logps(
    head,
    postprocess,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    with_stats: bool,
    sequences: Optional[torch.Tensor] = None,
    mass_sequences: int = 0,
    with_log_sum_sq: bool = False,
):
    """(token log-probs, mean logit per position[, log sum of squared probabilities][, max log-prob, entropy, argmax
    id[, mass]]) of one chunk of positions.

    The mean logit (TRL's `logits/*` metrics) is one reduction of the fp32 logits the log-softmax reads
    anyway; they are dropped before the stats so no more vocab-sized tensors are alive than before.
    With mass_sequences (and `sequences`, the sequence index of each position), the last output is
    (mass_sequences, V): row i sums the next-token probabilities over sequence i's positions in the chunk."""
    # the head module is called (not its weight read) so ZeRO-3 hooks gather the partitioned weight
    logits = head(hidden)
    if postprocess is not None:
        logits = postprocess(logits)
    logits = logits.float()
    mean_logits = logits.detach().mean(dim=-1)
    log_probs = torch.log_softmax(logits, dim=-1)
    del logits
    token_logps = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    per_position = (token_logps, mean_logits)
    if with_log_sum_sq:  # log sum_v p_v^2 = logsumexp(2 log p), without gradient (WPO weights are detached)
        per_position += (torch.logsumexp(2 * log_probs.detach(), dim=-1),)
    if not with_stats:
        return per_position
    max_logps, argmax = log_probs.max(dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1)
    if not mass_sequences:
        return *per_position, max_logps, entropy, argmax
    # positions of later sequences add into one spare row, dropped: the chunk's probabilities are not copied
    rows = sequences.clamp(max=mass_sequences)
    mass = probs.new_zeros(mass_sequences + 1, probs.shape[-1]).index_add_(0, rows, probs)
    return *per_position, max_logps, entropy, argmax, mass[:mass_sequences]


def kept_logps_bytes(scored_tokens: int, vocab_size: int, postprocessed: bool) -> int:
    """What a backward pass keeps per scored token when the head is not recomputed: the fp32 log-softmax
    output (and a post-processor's own saved logits, Gemma-2's tanh soft-cap)."""
    return scored_tokens * vocab_size * 4 * (2 if postprocessed else 1)


def sequence_logps(
    model,
    batch: SequenceBatch,
    chunk_size: int,
    with_stats: bool = False,
    min_scored_tokens: int = 0,
    keep_logps_mb: float = 0.0,
    with_hidden_sums: bool = False,
    mass_sequences: int = 0,
    with_log_sum_sq: bool = False,
) -> TokenLogps:
    """Log-probs of every scored response token of a batch in any layout (data/layout.py): row i of the
    result is sequence i, column k its k-th response token; identical numbers for padded and packed.
    with_stats adds each position's max log-prob, its argmax token and the entropy.

    min_scored_tokens: call the head as if at least this many tokens were scored (empty chunks past the
    end). Ranks scoring different batches in step (sharding.py) pass the same value, so they call the
    head equally often: under ZeRO-3 each call gathers its weight collectively. The recompute decision
    below reads the same count, so it is the same on every rank too.
    keep_logps_mb: with gradients on, keep the chunks' log-probs for backward when they fit in this many MB
    (the head runs once); otherwise recompute each chunk's head in backward (0 = always recompute).
    with_hidden_sums: also return each sequence's summed head-input hidden states (TokenLogps.hidden_sums).
    mass_sequences (with_stats): TokenLogps.mass sums the whole next-token distribution over the positions of
    each of sequences 0 .. mass_sequences-1, out of the log-softmax each chunk computes anyway (where the
    probability mass sits, for the probes' top gainers: train/token_views.py).
    with_log_sum_sq: also return log sum_v pi(v)^2 at each response position (TokenLogps.log_sum_sq, for WPO)."""
    if mass_sequences and not with_stats:
        raise ValueError("sequence_logps: mass_sequences needs with_stats=True")
    head = output_head(model)
    postprocess = logit_postprocessor(model.config)
    vocab_size = getattr(head, "out_features", None) or _text_config(model.config).vocab_size
    scored_tokens = max(int(batch.targets.shape[0]), min_scored_tokens)
    recompute_head = (
        torch.is_grad_enabled()
        and kept_logps_bytes(scored_tokens, vocab_size, postprocess is not None) > keep_logps_mb * 2**20
    )
    with autocast(model, batch.input_ids.device.type):
        with intercepted_head(head) as captured:
            if batch.pieces is not None:  # packed, attended piece by piece (model/attention.py)
                with pieces_attention(model):
                    model(
                        input_ids=batch.input_ids,
                        position_ids=batch.position_ids,
                        use_cache=False,
                        attention_pieces=batch.pieces,
                    )
            else:
                model(
                    input_ids=batch.input_ids,
                    attention_mask=model_attention_mask(model, batch.attention_mask),
                    position_ids=batch.position_ids,
                    use_cache=False,
                )
        if "hidden" not in captured:
            raise LogitsPathError(
                f"{type(model).__name__}'s forward never called its output head; prefopt cannot score it"
            )
        scored_hidden = captured["hidden"][
            batch.predictor_rows, batch.predictor_cols
        ]  # (S, H): only positions that score
        outputs = []
        for start in range(0, max(scored_hidden.shape[0], min_scored_tokens, 1), chunk_size):
            args = (
                head,
                postprocess,
                scored_hidden[start : start + chunk_size],
                batch.targets[start : start + chunk_size],
                with_stats,
                batch.sequence_index[start : start + chunk_size],
                mass_sequences,
                with_log_sum_sq,
            )
            if recompute_head:
                outputs.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
            else:
                outputs.append(_chunk_logps(*args))
    mass = None
    if mass_sequences:  # summed over the chunks in fp64: a token's mass adds up over hundreds of positions
        mass = sum(output[-1].double() for output in outputs)
        outputs = [output[:-1] for output in outputs]
    # back to (sequences, response tokens) with zeros past each response's end (index_put keeps the gradient path)
    shape = (batch.num_sequences, batch.max_response_length)
    where = (batch.sequence_index, batch.token_index)
    per_token = [
        torch.zeros(shape, dtype=values.dtype, device=batch.targets.device).index_put(where, values)
        for values in (torch.cat(parts) for parts in zip(*outputs))
    ]
    mask = torch.zeros(shape, dtype=torch.float32, device=batch.targets.device).index_put(
        where, torch.ones_like(batch.targets, dtype=torch.float32)
    )
    names = ("log_sum_sq",) * with_log_sum_sq + ("max_logps", "entropy", "argmax") * with_stats
    stats = dict(zip(names, per_token[2:]))
    if with_hidden_sums:
        hidden = scored_hidden.detach().to(torch.float64)
        sums = hidden.new_zeros((batch.num_sequences, hidden.shape[-1]))
        stats["hidden_sums"] = sums.index_add(0, batch.sequence_index, hidden)
    return TokenLogps(per_token[0], mask, mean_logits=per_token[1], mass=mass, **stats)


def model_attention_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """A packed batch's boolean (rows, 1, L, L) mask as the model's attention takes it: boolean for SDPA,
    additive (0 / dtype min) for eager attention, which adds it to the scores."""
    if mask.dim() != 4 or getattr(model.config, "_attn_implementation", "sdpa") != "eager":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def response_token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
    with_stats: bool = False,
    keep_logps_mb: float = 0.0,
) -> TokenLogps:
    """Log-probs of the labelled tokens (labels != -100) of right-padded rows, one sequence per row."""
    return sequence_logps(
        model,
        labelled_rows_batch(input_ids, attention_mask, labels),
        chunk_size,
        with_stats,
        keep_logps_mb=keep_logps_mb,
    )


def labelled_rows_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> SequenceBatch:
    """Right-padded rows, one sequence per row, scored where labels != -100, as a SequenceBatch."""
    targets = labels[:, 1:]
    rows, columns = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    first = torch.full((labels.shape[0],), labels.shape[1], dtype=torch.long, device=labels.device)
    first = first.scatter_reduce(0, rows, columns, reduce="amin")
    token_index = columns - first[rows]
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=None,
        predictor_rows=rows,
        predictor_cols=columns,
        targets=targets[rows, columns],
        sequence_index=rows,
        token_index=token_index,
        num_sequences=labels.shape[0],
        max_response_length=int(token_index.max()) + 1 if token_index.numel() else 0,
        real_tokens=int(attention_mask.sum()),
    )


@torch.no_grad()
def check_logits_path(model, vocab_size: int, device, tolerance: float = 1e-4) -> float:
    """Prove once that response_token_logps equals log_softmax(model(...).logits) for this model.

    Runs before any engine wraps the model, in fp32 (autocast off: bf16 noise on a real model's random
    inputs would hide a real difference, or fake one). Returns the largest absolute difference; raises
    LogitsPathError when it exceeds the tolerance."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (2, 12), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[attention_mask == 0] = IGNORE_INDEX
    was_training = model.training
    model.eval()
    try:
        with full_precision(model):
            ours = response_token_logps(model, input_ids, attention_mask, labels, chunk_size=5)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        model.train(was_training)
    scored = (labels[:, 1:] != IGNORE_INDEX).float()
    expected = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    difference = float((ours.summed - (expected * scored).sum(-1)).abs().max())
    limit = tolerance if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not difference <= limit:
        raise LogitsPathError(
            f"{type(model).__name__}: log-probs from the output head differ from log_softmax(model(...).logits) by "
            f"{difference:.3g} (limit {limit:g}). Its forward post-processes logits in a way prefopt does not know "
            "(see prefopt/model/logps.py logit_postprocessor); add it there before training this architecture"
        )
    return difference


def sliding_window_layers(config) -> Optional[int]:
    """The sliding window some of the model's layers attend within, or None when every layer sees it all."""
    config = _text_config(config)
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return window if getattr(config, "use_sliding_window", True) else None


@torch.no_grad()
def check_packed_path(model, vocab_size: int, device, layout: BatchLayout) -> float:
    """Prove once that this model's attention takes the packed, prefix-shared layout as `layout` attends it:
    two prompts with two responses each, packed into one row, must score as in padded rows. Refuses
    (ConfigError) otherwise, and refuses dense packed attention for a model with sliding-window layers: one
    4-D mask serves every layer, so it cannot hold a window that only some layers use. The probe is shorter
    than any window, so for pieces it also proves the window reaches the attention call (else it is refused),
    and chunked attention (Llama-4's attention_chunk_size), which neither path applies, is refused."""
    window = sliding_window_layers(model.config)
    chunked = getattr(_text_config(model.config), "attention_chunk_size", None)
    if chunked:
        raise ConfigError(
            f"{type(model).__name__} uses chunked attention (attention_chunk_size={chunked}), which packed batches "
            "do not apply; run it with trainer.batching=padded"
        )
    if layout.attention == "dense" and window:
        raise ConfigError(
            f"{type(model).__name__} has sliding-window attention layers (window {window}); "
            "trainer.attention=dense gives every layer the same packed mask, so those layers would see past "
            "their window. Use trainer.attention=pieces (which applies the window per layer) or trainer.batching=padded"
        )
    generator = torch.Generator().manual_seed(1)
    draw = lambda length: torch.randint(0, vocab_size, (length,), generator=generator).tolist()  # noqa: E731
    groups = [(draw(6), [(0, draw(4)), (2, draw(5))]), (draw(3), [(1, draw(2)), (3, draw(6))])]
    was_training = model.training
    model.eval()
    try:
        with full_precision(model):  # the mask's meaning does not depend on the dtype; fp32 keeps the check sharp
            packed_batch = layout.build(groups, 0).to(device)
            packed = sequence_logps(model, packed_batch, chunk_size=64).summed
            padded = sequence_logps(model, PADDED.build(groups, 0).to(device), chunk_size=64).summed
    finally:
        model.train(was_training)
    if packed_batch.pieces is not None and window and window not in packed_batch.pieces.windows_seen:
        raise ConfigError(
            f"{type(model).__name__} has sliding-window layers (window {window}) but its attention calls never pass "
            "the window on, so attention by pieces cannot apply it; run it with trainer.batching=padded"
        )
    difference = float((packed - padded).abs().max())
    limit = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not difference <= limit:
        raise ConfigError(
            f"{type(model).__name__} with attn_implementation={getattr(model.config, '_attn_implementation', '?')} "
            f"does not take prefix-shared, packed batches with trainer.attention={layout.attention} (packed and padded "
            f"log-probs differ by {difference:.3g}); run it with trainer.batching=padded"
        )
    return difference


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [0:B] are chosen and [B:2B] rejected (data/layout.py pair_groups numbers them so)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]
