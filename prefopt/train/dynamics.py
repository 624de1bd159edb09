"""Learning-dynamics probes: a fixed set of held-out prompts, each with six kinds of response, whose
log-probs are measured during training (Ren & Sutherland, "Learning Dynamics of LLM Finetuning",
ICLR 2025).

Response types per probe prompt x:
    chosen       its chosen response y+
    rejected     its rejected response y-
    other_train  the chosen response of a different training prompt (an unrelated, fluent response)
    other_test   the chosen response of a different held-out prompt
    permuted     y+'s tokens in random order (same tokens, no longer fluent), a final EOS kept last
    random       uniformly random non-special tokens, as many as y+
and one derived path:
    greedy       sum_t max_v log pi(v | x, y+_<t): the argmax token at every position of y+'s prefix,
                 i.e. where the model's mass peaks.

The squeezing effect shows as: rejected falls (it is pushed down), greedy rises (the freed mass lands on
the argmax), and chosen and the four others fall too. Everything here is pure: it returns dicts, the
trainer writes them. The same forward also gives the per-token view of chosen, rejected and greedy and
where the mass went (dynamics.token_views: token_views.py).

A dataset whose prompts are all the same has no response to another prompt: the probe set then leaves
out other_train and other_test (with one warning), and "others" averages the kinds that remain.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Optional

import torch

from prefopt.core.distributed import DistInfo
from prefopt.data import DataError, PreferenceData, TokenizedPair
from prefopt.data.layout import PADDED, BatchLayout
from prefopt.data.tokenize import end_of_turn_ids
from prefopt.model.logps import TokenLogps, sequence_logps
from prefopt.train.sharding import sharded_objects, sharded_pass
from prefopt.train.token_views import ProbeTokens, TokenColumns

RESPONSE_TYPES = ("chosen", "rejected", "other_train", "other_test", "permuted", "random")
OTHER_TYPES = ("other_train", "other_test", "permuted", "random")
MASS_METRICS = ("peakiness", "entropy", "target_prob")
OTHER_PROMPT_TYPES = ("other_train", "other_test")  # responses to another prompt: absent when every prompt is the same
# right padding is masked out (attention 0, label -100), so any in-vocabulary id pads
PAD_ID = 0

logger = logging.getLogger("prefopt")


@dataclass
class ProbeSet:
    prompt_ids: list[list[int]]  # one prompt per probe
    prompts: list[str]  # the rendered prompt texts, for generation logs
    responses: dict[str, list[list[int]]]  # response type -> one token-id list per probe, in RESPONSE_TYPES order

    def __len__(self) -> int:
        return len(self.prompt_ids)


def pick_other_response(pool: list[TokenizedPair], prompt_ids: list[int], rng: random.Random) -> list[int] | None:
    """The chosen response of a random pair in `pool` whose prompt differs from `prompt_ids`; None if there is none."""
    if not pool:
        return None
    for _ in range(16):  # a few random draws find one at once unless most of the pool shares this prompt
        pair = pool[rng.randrange(len(pool))]
        if pair.prompt_ids != prompt_ids:
            return list(pair.chosen_ids)
    candidates = [pair for pair in pool if pair.prompt_ids != prompt_ids]
    return list(rng.choice(candidates).chosen_ids) if candidates else None


def permuted_response(response_ids: list[int], special_ids: set[int], rng: random.Random) -> list[int]:
    """The tokens in random order; a final special token (the EOS) stays last, so only content is shuffled."""
    keep_last = bool(response_ids) and response_ids[-1] in special_ids
    body = list(response_ids[:-1] if keep_last else response_ids)
    rng.shuffle(body)
    return body + [response_ids[-1]] if keep_last else body


def random_response(length: int, allowed_ids: list[int], rng: random.Random) -> list[int]:
    return [rng.choice(allowed_ids) for _ in range(length)]


def build_probe_set(
    data: PreferenceData, num_probes: int, seed: int, vocab_size: int, special_ids: set[int]
) -> ProbeSet:
    """The first `num_probes` held-out pairs with their responses, deterministic for a seed.

    vocab_size is the tokenizer's (len(tokenizer)): a model's embedding may be padded past it with rows
    no text ever uses. Each probe draws from its own generator, so probe i is the same whatever num_probes is.
    """
    probes = data.eval[:num_probes]
    if not probes:
        raise DataError(
            "the probe set (dynamics.enabled=true) needs held-out pairs, and the eval split has none; give held-out "
            "data (dataset.eval_fraction, dataset.max_eval_examples) or set dynamics.enabled=false"
        )
    allowed_ids = [token for token in range(vocab_size) if token not in special_ids]
    responses: dict[str, list] = {name: [] for name in RESPONSE_TYPES}
    for index, pair in enumerate(probes):
        rng = random.Random(seed * 1_000_003 + index)
        responses["chosen"].append(list(pair.chosen_ids))
        responses["rejected"].append(list(pair.rejected_ids))
        responses["other_train"].append(pick_other_response(data.train, pair.prompt_ids, rng))
        # with a single held-out prompt there is no other one: fall back to a second training response
        other_test = pick_other_response(data.eval, pair.prompt_ids, rng) or pick_other_response(
            data.train, pair.prompt_ids, rng
        )
        responses["other_test"].append(other_test)
        responses["permuted"].append(permuted_response(pair.chosen_ids, special_ids, rng))
        responses["random"].append(random_response(len(pair.chosen_ids), allowed_ids, rng))
    missing = [name for name in OTHER_PROMPT_TYPES if None in responses[name]]
    if missing:
        logger.warning(
            "probe set: no pair has a prompt different from a probe's (are all prompts the same?), so there is no "
            "response to another prompt: leaving out %s; dynamics/others averages the remaining kinds",
            " and ".join(missing),
        )
    responses = {name: values for name, values in responses.items() if name not in missing}
    return ProbeSet([list(pair.prompt_ids) for pair in probes], [pair.prompt for pair in probes], responses)


def token_sums(token: TokenLogps, with_stats: bool) -> dict[str, torch.Tensor]:
    """Per-sequence sums over response tokens: logp and length, and with_stats greedy (max) logp,
    max-token probability, entropy and target probability. All (N,) on the CPU."""
    sums = {"logp": token.summed, "length": token.lengths}
    if with_stats:
        sums |= {
            "greedy": token.max_logps.sum(-1),
            "peakiness": (token.max_logps.exp() * token.mask).sum(-1),
            "entropy": token.entropy.sum(-1),
            "target_prob": (token.logps.exp() * token.mask).sum(-1),
        }
    return {key: value.float().cpu() for key, value in sums.items()}


def sequence_stats(
    model,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    chunk_size: int,
    device,
    batch_size: int,
    with_stats: bool,
) -> dict[str, torch.Tensor]:
    """token_sums of one response per prompt, padded rows (the reference path the packed probes are checked against)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(prompt_ids), batch_size):
        groups = [
            (prompt, [(index, response)])
            for index, (prompt, response) in enumerate(
                zip(prompt_ids[start : start + batch_size], response_ids[start : start + batch_size])
            )
        ]
        token = sequence_logps(model, PADDED.build(groups, PAD_ID).to(device), chunk_size, with_stats=with_stats)
        for key, value in token_sums(token, with_stats).items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


@dataclass
class ProbeMeasure:
    """One probe evaluation: the per-sequence stats (response type -> stat -> (probes,)) and, with token views,
    the per-token values (token_views.py)."""

    stats: dict[str, dict[str, torch.Tensor]]
    tokens: Optional[ProbeTokens] = None


def probe_stats(
    model,
    probe_set: ProbeSet,
    chunk_size: int,
    device,
    batch_size: int,
    layout: BatchLayout,
    dist: Optional[DistInfo] = None,
    token_views: bool = False,
) -> ProbeMeasure:
    """token_sums of every response type of every probe, and with token_views the per-token values of the chosen,
    rejected and greedy paths out of the same forward. Each probe's prompt and all its responses form one group,
    so the packed layout computes the prompt once. With several ranks each scores a shard of the probes and
    every rank gets all of them (sharding.py: the per-token values travel padded in the same gathered rows)."""
    names = list(probe_set.responses)
    keys: list[str] = []
    columns = TokenColumns(probe_set.responses["chosen"], probe_set.responses["rejected"]) if token_views else None
    rejected_kind = names.index("rejected")  # chosen is the first type: its sequences are 0 .. count-1

    def score(probes: list[int], peer_scored_tokens: int) -> torch.Tensor:
        count = len(probes)
        groups = [
            (
                probe_set.prompt_ids[probe],
                [(kind * count + offset, probe_set.responses[name][probe]) for kind, name in enumerate(names)],
            )
            for offset, probe in enumerate(probes)
        ]
        batch = layout.build(groups, PAD_ID).to(device)
        token = sequence_logps(
            model,
            batch,
            chunk_size,
            with_stats=True,
            min_scored_tokens=peer_scored_tokens,
            mass_sequences=count if columns is not None else 0,
        )
        sums = token_sums(token, with_stats=True)
        keys[:] = list(sums)
        # columns: response type major, stat minor; rows: probes
        block = torch.stack(
            [sums[key][kind * count : (kind + 1) * count] for kind in range(len(names)) for key in keys], dim=1
        )
        if columns is None:
            return block
        rejected_rows = slice(rejected_kind * count, (rejected_kind + 1) * count)
        return torch.cat([block.double(), columns.pack(token, slice(0, count), rejected_rows)], dim=1)

    def probe_tokens(probe: int) -> int:
        return sum(len(probe_set.responses[name][probe]) for name in names)

    values = sharded_pass(len(probe_set), batch_size, dist or DistInfo(), score, probe_tokens)
    width = len(names) * len(keys)
    stat_columns = iter(values[:, :width].to(torch.float32).unbind(dim=1))
    stats = {name: {key: next(stat_columns) for key in keys} for name in names}
    return ProbeMeasure(stats, columns.unpack(values[:, width:]) if columns is not None else None)


@torch.no_grad()
def measure_probes(
    model,
    probe_set: ProbeSet,
    chunk_size: int,
    device,
    batch_size: int,
    layout: BatchLayout = BatchLayout(),
    dist: Optional[DistInfo] = None,
    token_views: bool = False,
) -> ProbeMeasure:
    """probe_stats in eval mode (the model's training mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        return probe_stats(model, probe_set, chunk_size, device, batch_size, layout, dist, token_views)
    finally:
        model.train(was_training)


def evaluate_probes(
    model,
    probe_set: ProbeSet,
    chunk_size: int,
    device,
    batch_size: int,
    layout: BatchLayout = BatchLayout(),
    dist: Optional[DistInfo] = None,
) -> dict[str, float]:
    """probe_metrics of a probe evaluation (without token views)."""
    measure = measure_probes(model, probe_set, chunk_size, device, batch_size, layout, dist)
    return probe_metrics(measure.stats, probe_set)


def probe_metrics(all_stats: dict[str, dict[str, torch.Tensor]], probe_set: ProbeSet) -> dict[str, float]:
    """Mean over probes of each response type's summed (`logp`) and per-token mean (`logp_mean`) log-prob,
    the greedy path's, the mean of the four others', and mass metrics on the chosen positions (each a
    mean over probes of the per-token mean). Keys: dynamics/<type>/logp[_mean], dynamics/mass/<metric>.
    Every rank has every probe's stats (probe_stats), so every rank returns the same metrics."""
    metrics: dict[str, float] = {}
    for name, stats in all_stats.items():
        lengths = stats["length"].clamp(min=1)
        metrics[f"dynamics/{name}/logp"] = float(stats["logp"].mean())
        metrics[f"dynamics/{name}/logp_mean"] = float((stats["logp"] / lengths).mean())
        if name == "chosen":
            metrics["dynamics/greedy/logp"] = float(stats["greedy"].mean())
            metrics["dynamics/greedy/logp_mean"] = float((stats["greedy"] / lengths).mean())
            metrics |= {f"dynamics/mass/{key}": float((stats[key] / lengths).mean()) for key in MASS_METRICS}
    others = [name for name in OTHER_TYPES if name in probe_set.responses]
    for suffix in ("logp", "logp_mean"):
        metrics[f"dynamics/others/{suffix}"] = sum(metrics[f"dynamics/{name}/{suffix}"] for name in others) / len(
            others
        )
    return metrics


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    device,
    batch_size: int = 16,
    dist: Optional[DistInfo] = None,
) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded for generation), decoded without specials.
    Generation stops at EOS or where the chat template ends a turn (<|im_end|> on a base model whose EOS
    is <|endoftext|>): the responses were trained to end there.

    With several ranks (dist) each generates a shard of the prompts and every rank returns all texts. The
    ranks decode in lockstep (synced_gpus: a rank whose answers ended keeps stepping until every rank's
    have), so under ZeRO-3 they run the same forwards."""
    dist = dist or DistInfo()
    lockstep = dist.initialized and dist.world_size > 1
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = end_of_turn_ids(tokenizer)

    def generate(indices: list[int]) -> list[str]:
        chunk = [prompt_ids[index] for index in indices]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=stop_ids,
            synced_gpus=lockstep,
        )
        return [tokenizer.decode(row, skip_special_tokens=True) for row in generated[:, width:]]

    try:
        return sharded_objects(len(prompt_ids), batch_size, dist, generate)
    finally:
        model.train(was_training)


def generate_probes(
    model, tokenizer, probe_set: ProbeSet, num: int, max_new_tokens: int, device, dist: Optional[DistInfo] = None
) -> list[list[str]]:
    """[[prompt, greedy generation], ...] for the first `num` probes (dynamics.generate)."""
    generations = greedy_generate(model, tokenizer, probe_set.prompt_ids[:num], max_new_tokens, device, dist=dist)
    return [[prompt, text] for prompt, text in zip(probe_set.prompts[:num], generations)]


def dynamics_deltas(first: dict[str, float], last: dict[str, float]) -> dict[str, float]:
    """Change of the summed log-probs from the first to the last probe evaluation: delta/<type> for every
    response type probed, delta/greedy, delta/others (mean of the others) and delta/margin (chosen - rejected)."""
    deltas = {
        f"delta/{name}": last[f"dynamics/{name}/logp"] - first[f"dynamics/{name}/logp"]
        for name in (*RESPONSE_TYPES, "greedy", "others")
        if f"dynamics/{name}/logp" in first and f"dynamics/{name}/logp" in last
    }
    deltas["delta/margin"] = deltas["delta/chosen"] - deltas["delta/rejected"]
    return deltas
