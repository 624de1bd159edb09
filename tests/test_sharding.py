"""Eval, probes, greedy generation and the reference precompute split across ranks (prefopt/train/sharding.py):
disjoint shards, every item once, one gather, every rank ends with the one-rank numbers; and every rank
runs the same forwards and calls the output head equally often (what ZeRO-3's collective parameter
gathering needs), padding batches included. Two real gloo ranks here; DeepSpeed ZeRO-3 end to end in
tests/test_distributed.py."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from prefopt.core.distributed import DistInfo
from prefopt.train.sharding import shard_plan, sharded_objects, sharded_pass

CHUNK = 7  # log-prob chunk: small, so ranks' batches need different numbers of head calls
BATCH = 2  # 5 items on 2 ranks: rank 0 scores 2 batches, rank 1 one batch and one padding batch
ITEMS = 5


@pytest.mark.parametrize("count, batch_size, world_size", [(5, 2, 2), (1, 4, 2), (9, 2, 3), (8, 3, 1), (3, 1, 4)])
def test_shard_plan_covers_every_item_once_with_equal_batch_counts(count, batch_size, world_size):
    plan = shard_plan(count, batch_size, world_size)
    assert len({len(batches) for batches in plan.batches}) == 1  # the same number of forwards on every rank
    owned = [
        index for rank, batches in enumerate(plan.batches) for batch in batches[: plan.owned[rank]] for index in batch
    ]
    assert sorted(owned) == list(range(count))
    for rank, batches in enumerate(plan.batches):
        assert all(index % world_size == rank for batch in batches[: plan.owned[rank]] for index in batch)
        assert all(
            batch and all(0 <= index < count for index in batch) for batch in batches
        )  # padding scores real items


def test_shard_plan_refuses_nonsense():
    with pytest.raises(ValueError, match="batch_size"):
        shard_plan(3, 0, 2)


def test_one_rank_pass_is_the_items_in_order():
    calls = []

    def score(indices, peer_tokens):
        calls.append((indices, peer_tokens))
        return torch.tensor([[index, index * 10.0] for index in indices])

    values = sharded_pass(5, 2, DistInfo(), score, item_tokens=lambda index: index + 1)
    assert values[:, 0].tolist() == [0, 1, 2, 3, 4] and values[:, 1].tolist() == [0, 10, 20, 30, 40]
    assert calls == [([0, 1], 3), ([2, 3], 7), ([4], 5)]
    assert sharded_objects(3, 2, DistInfo(), lambda indices: [f"t{index}" for index in indices]) == ["t0", "t1", "t2"]
    assert sharded_pass(0, 2, DistInfo(), score).shape[0] == 0


def make_pairs(tokenizer):
    """Pairs of varied lengths (so ranks' batches score different token counts), with answers for greedy eval."""
    from prefopt.data import TokenizedPair

    pairs = []
    for index in range(ITEMS):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"q{index} " + "x" * (3 * index)}], tokenize=False, add_generation_prompt=True
        )
        chosen, rejected = f"{index}" + "a" * (4 + 5 * index), "b" * (2 + 7 * (ITEMS - index))
        ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        eos = [tokenizer.eos_token_id]
        pairs.append(
            TokenizedPair(
                ids(prompt), ids(chosen) + eos, ids(rejected) + eos, prompt, chosen, rejected, str(index), index
            )
        )
    return pairs


def count_calls(module: torch.nn.Module) -> list[int]:
    counter = [0]
    module.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def held_out_results(dist: DistInfo) -> dict:
    """Eval metrics, probe metrics, greedy texts and reference log-probs, plus how often this rank ran each
    model's forward and head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefopt.data import PreferenceData
    from prefopt.data.layout import BatchLayout
    from prefopt.model.loading import build_byte_tokenizer
    from prefopt.train.dynamics import build_probe_set, evaluate_probes, greedy_generate, measure_probes
    from prefopt.train.evaluation import evaluate, greedy_accuracy
    from prefopt.train.reference import ModelReference, compute_reference_logps
    from prefopt.train.step import PreferenceStep
    from tests.test_config import compose_config

    tokenizer = build_byte_tokenizer()
    pairs = make_pairs(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    policy = LlamaForCausalLM(config)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference unlike the policy, so rewards are not all zero
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    counters = {
        "policy_forwards": count_calls(policy),
        "policy_head": count_calls(policy.get_output_embeddings()),
        "reference_forwards": count_calls(reference),
        "reference_head": count_calls(reference.get_output_embeddings()),
    }
    cfg = compose_config(
        [
            "model=tiny_llama",
            "loss=gate_dpo",
            "hardware=cpu",
            f"trainer.logp_chunk_size={CHUNK}",
            "trainer.packed_row_tokens=64",
            "trainer.eval_batch_size=2",
        ]
    )
    step_fn = PreferenceStep(cfg, policy, ModelReference(reference, CHUNK), torch.device("cpu"), tokenizer.pad_token_id)
    probes = build_probe_set(
        PreferenceData(train=pairs, eval=pairs), ITEMS, 3, len(tokenizer), set(tokenizer.all_special_ids)
    )
    results = {
        "eval": evaluate(step_fn, pairs, BATCH, None, 0, dist),
        "eval_one_pair": evaluate(step_fn, pairs[:1], BATCH, None, 0, dist),  # rank 1's shard is empty: padding only
        "probes": evaluate_probes(policy, probes, CHUNK, "cpu", BATCH, BatchLayout("packed", 64), dist),
        "probe_tokens": token_views_state(
            measure_probes(policy, probes, CHUNK, "cpu", BATCH, BatchLayout("packed", 64), dist, token_views=True)
        ),
        "greedy": greedy_generate(
            policy, tokenizer, [pair.prompt_ids for pair in pairs], 5, "cpu", batch_size=BATCH, dist=dist
        ),
        "greedy_accuracy": greedy_accuracy(policy, tokenizer, pairs, 5, "cpu", dist)[0],
        "reference": compute_reference_logps(reference, pairs, cfg, dist, "cpu", tokenizer.pad_token_id).tolist(),
    }
    return results | {name: counter[0] for name, counter in counters.items()} | {"onpolicy": onpolicy_tokens(dist)}


def onpolicy_tokens(dist: DistInfo) -> list:
    """arith onpolicy samples (train/onpolicy.py) of 7 questions in 4 groups of 2: rank 0 draws groups 0 and 2, rank 1
    groups 1 and 3 (one question), with a model of their own (the forward counters above stay the passes')."""
    from prefopt.model.loading import ModelSource, build_byte_tokenizer
    from prefopt.train.onpolicy import OnPolicySampler, sampled_tokens
    from tests.helpers import tiny_byte_llama
    from tests.test_config import compose_config

    cfg = compose_config(
        [
            "model=tiny_llama",
            "dataset.arith.rejected_style=onpolicy",
            "dataset.arith.num_train=5",
            "dataset.arith.num_eval=2",
            "dataset.arith.onpolicy.questions_per_batch=2",
            "dataset.arith.onpolicy.samples=2",
            "dataset.arith.onpolicy.max_new_tokens=6",
        ]
    )
    tokenizer = build_byte_tokenizer()
    sampler = OnPolicySampler(cfg.model, cfg.dataset, 3, ModelSource("tiny", "", "tiny"), tokenizer)
    return sampled_tokens(tiny_byte_llama(tokenizer, seed=5).eval(), tokenizer, sampler, 3, dist, "cpu")


def token_views_state(measure) -> dict:
    """The per-token probe values (train/token_views.py) as JSON: kind -> per probe lists, and the mass vector."""
    tokens = measure.tokens
    return {"logps": tokens.logps, "token_ids": tokens.token_ids, "mass": tokens.mass.tolist()}


def rank_main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = held_out_results(DistInfo(rank, rank, world_size, initialized=True))
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
        torch.distributed.barrier()  # no rank tears gloo down while its peer still has work in flight (SIGABRT)
    finally:
        torch.distributed.destroy_process_group()


def assert_close_metrics(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(actual[key], value, rel_tol=1e-5, abs_tol=1e-5), (key, actual[key], value)


def test_the_pairs_make_ranks_need_different_head_calls():
    """Guard for the next test: without min_scored_tokens the two ranks would call the head unequally."""
    from prefopt.model.loading import build_byte_tokenizer

    pairs = make_pairs(build_byte_tokenizer())
    plan = shard_plan(ITEMS, BATCH, 2)
    natural = [
        [-(-sum(len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids) for i in batch) // CHUNK) for batch in batches]
        for batches in plan.batches
    ]
    assert natural[0] != natural[1]
    assert plan.owned == [2, 1]  # rank 1 runs a padding batch


@pytest.mark.slow  # three processes build the same models and run every pass (~60 s of CPU)
def test_two_ranks_match_one_rank_and_run_the_same_forwards(tmp_path):
    import torch.multiprocessing

    single = held_out_results(DistInfo())
    torch.multiprocessing.spawn(rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in ranks:
        assert_close_metrics(result["eval"], single["eval"])
        assert_close_metrics(result["eval_one_pair"], single["eval_one_pair"])
        assert_close_metrics(result["probes"], single["probes"])
        assert result["greedy"] == single["greedy"] and result["greedy_accuracy"] == single["greedy_accuracy"]
        assert result["onpolicy"] == single["onpolicy"] and len(single["onpolicy"]) == 7  # sampled by either rank
        tokens, expected = result["probe_tokens"], single["probe_tokens"]  # per-token views, gathered padded
        assert tokens["token_ids"] == expected["token_ids"]
        for kind, per_probe in expected["logps"].items():
            for got, want in zip(tokens["logps"][kind], per_probe):
                assert got == pytest.approx(want, abs=1e-5), kind
        torch.testing.assert_close(torch.tensor(tokens["mass"]), torch.tensor(expected["mass"]), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            torch.tensor(result["reference"]), torch.tensor(single["reference"]), rtol=1e-5, atol=1e-5
        )
    assert "eval/gate/p50" in single["eval"] and len(single["greedy"]) == ITEMS
    for counter in ("policy_forwards", "policy_head", "reference_forwards", "reference_head"):
        assert ranks[0][counter] == ranks[1][counter], counter  # ZeRO-3: the same collective gathers on every rank
    # and each rank did only about half the work of one rank alone (its shard plus at most one padding batch per pass)
    assert ranks[0]["policy_forwards"] < single["policy_forwards"]
