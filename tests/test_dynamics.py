"""Probe set and probe evaluation: log-probs match a direct computation, response types are built right,
the set is deterministic, and the real model finds random tokens far less likely than the chosen answer."""

from __future__ import annotations

import pytest
import torch

from prefopt.data import PreferenceData, TokenizedPair
from prefopt.train.dynamics import (
    OTHER_TYPES,
    RESPONSE_TYPES,
    build_probe_set,
    dynamics_deltas,
    evaluate_probes,
    generate_probes,
    sequence_stats,
)
from tests.helpers import preset, tiny_byte_llama


def make_pair(tokenizer, index: int, a: int, b: int) -> TokenizedPair:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"What is {a} + {b}?"}], tokenize=False, add_generation_prompt=True
    )
    chosen, rejected = f"{a} + {b} = {a + b}", f"{a} + {b} = {a + b + 1}"
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    eos = [tokenizer.eos_token_id]
    return TokenizedPair(
        ids(prompt), ids(chosen) + eos, ids(rejected) + eos, prompt, chosen, rejected, str(a + b), index
    )


@pytest.fixture(scope="module")
def tokenizer(byte_tokenizer):
    return byte_tokenizer


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return tiny_byte_llama(tokenizer).eval()


@pytest.fixture(scope="module")
def data(tokenizer):
    train = [make_pair(tokenizer, i, i, 2 * i + 1) for i in range(6)]
    eval_pairs = [make_pair(tokenizer, 100 + i, 10 + 3 * i, i) for i in range(4)]
    return PreferenceData(train=train, eval=eval_pairs)


def special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids)


@pytest.fixture(scope="module")
def probes(data, tokenizer):
    return build_probe_set(data, num_probes=3, seed=7, vocab_size=len(tokenizer), special_ids=special_ids(tokenizer))


def direct_stats(model, prompt: list[int], response: list[int]) -> dict[str, float]:
    """Unpadded forward, full-vocabulary log-softmax: the reference for the chunked, batched computation."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].double(), dim=-1)
    rows = log_probs[len(prompt) - 1 : len(prompt) + len(response) - 1]  # row t scores token t+1
    token_logps = rows[torch.arange(len(response)), torch.tensor(response)]
    return {
        "logp": float(token_logps.sum()),
        "greedy": float(rows.max(-1).values.sum()),
        "peakiness": float(rows.max(-1).values.exp().mean()),
        "entropy": float(-(rows.exp() * rows).sum(-1).mean()),
        "target_prob": float(token_logps.exp().mean()),
    }


def test_probe_set_shapes_and_response_types(probes, data, tokenizer):
    specials = special_ids(tokenizer)
    assert len(probes) == 3 and probes.prompt_ids == [pair.prompt_ids for pair in data.eval[:3]]
    assert set(probes.responses) == set(RESPONSE_TYPES)
    train_chosen = [pair.chosen_ids for pair in data.train]
    eval_chosen = [pair.chosen_ids for pair in data.eval]
    for index, pair in enumerate(data.eval[:3]):
        chosen = probes.responses["chosen"][index]
        assert chosen == pair.chosen_ids and probes.responses["rejected"][index] == pair.rejected_ids
        assert probes.responses["other_train"][index] in train_chosen
        other_test = probes.responses["other_test"][index]
        assert other_test in eval_chosen and other_test != pair.chosen_ids
        permuted = probes.responses["permuted"][index]
        assert sorted(permuted) == sorted(chosen) and permuted[-1] == tokenizer.eos_token_id
        assert permuted != chosen  # 10+ content tokens: a permutation equal to the original is vanishingly rare
        random_ids = probes.responses["random"][index]
        assert len(random_ids) == len(chosen)
        assert all(0 <= token < len(tokenizer) and token not in specials for token in random_ids)


def test_probe_set_is_deterministic_for_a_seed(data, tokenizer, probes):
    kwargs = dict(vocab_size=len(tokenizer), special_ids=special_ids(tokenizer))
    assert build_probe_set(data, num_probes=3, seed=7, **kwargs).responses == probes.responses
    assert build_probe_set(data, num_probes=3, seed=8, **kwargs).responses["random"] != probes.responses["random"]
    # probe i does not depend on how many probes there are
    fewer = build_probe_set(data, num_probes=2, seed=7, **kwargs)
    assert all(fewer.responses[name] == probes.responses[name][:2] for name in RESPONSE_TYPES)


def test_probe_log_probs_match_a_direct_computation(tiny_model, probes):
    # batch_size 2 over 3 probes of different lengths: padded rows and a partial batch; chunk_size 5 splits positions
    expected = {
        name: [direct_stats(tiny_model, p, r) for p, r in zip(probes.prompt_ids, probes.responses[name])]
        for name in RESPONSE_TYPES
    }
    for name in RESPONSE_TYPES:
        stats = sequence_stats(tiny_model, probes.prompt_ids, probes.responses[name], 5, "cpu", 2, with_stats=True)
        assert stats["logp"].tolist() == pytest.approx([row["logp"] for row in expected[name]], abs=1e-5)
        assert bool((stats["greedy"] >= stats["logp"]).all()), name  # the argmax path dominates, per probe

    metrics = evaluate_probes(tiny_model, probes, chunk_size=5, device="cpu", batch_size=2)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    lengths = [len(r) for r in probes.responses["chosen"]]
    for name in RESPONSE_TYPES:
        assert metrics[f"dynamics/{name}/logp"] == pytest.approx(
            mean([row["logp"] for row in expected[name]]), abs=1e-5
        )
        per_token = [row["logp"] / len(r) for row, r in zip(expected[name], probes.responses[name])]
        assert metrics[f"dynamics/{name}/logp_mean"] == pytest.approx(mean(per_token), abs=1e-5)
    chosen = expected["chosen"]
    assert metrics["dynamics/greedy/logp"] == pytest.approx(mean([row["greedy"] for row in chosen]), abs=1e-5)
    assert metrics["dynamics/greedy/logp_mean"] == pytest.approx(
        mean([row["greedy"] / n for row, n in zip(chosen, lengths)]), abs=1e-5
    )
    for key in ("peakiness", "entropy", "target_prob"):
        assert metrics[f"dynamics/mass/{key}"] == pytest.approx(mean([row[key] for row in chosen]), abs=1e-5)
    assert metrics["dynamics/others/logp"] == pytest.approx(
        mean([metrics[f"dynamics/{name}/logp"] for name in OTHER_TYPES])
    )
    assert metrics["dynamics/greedy/logp"] >= metrics["dynamics/chosen/logp"]


def test_evaluate_probes_restores_the_training_mode(tiny_model, probes):
    tiny_model.train()
    try:
        evaluate_probes(tiny_model, probes, chunk_size=64, device="cpu", batch_size=8)
        assert tiny_model.training
    finally:
        tiny_model.eval()
    evaluate_probes(tiny_model, probes, chunk_size=64, device="cpu", batch_size=8)
    assert not tiny_model.training


def test_generate_probes(tiny_model, tokenizer, probes):
    generations = generate_probes(tiny_model, tokenizer, probes, num=2, max_new_tokens=3, device="cpu")
    assert [prompt for prompt, _ in generations] == probes.prompts[:2]
    assert all(isinstance(text, str) for _, text in generations)


def test_single_held_out_pair_falls_back_to_training_for_other_test(data, tokenizer):
    probes = build_probe_set(
        PreferenceData(train=data.train, eval=data.eval[:1]), 5, 0, len(tokenizer), special_ids(tokenizer)
    )
    assert len(probes) == 1 and probes.responses["other_test"][0] in [pair.chosen_ids for pair in data.train]


def test_dynamics_deltas():
    def point(chosen, rejected, greedy, others):
        row = {f"dynamics/{name}/logp": others[i] for i, name in enumerate(OTHER_TYPES)}
        return row | {
            "dynamics/chosen/logp": chosen,
            "dynamics/rejected/logp": rejected,
            "dynamics/greedy/logp": greedy,
            "dynamics/others/logp": sum(others) / 4,
        }

    deltas = dynamics_deltas(point(-10, -20, -5, [-30, -40, -50, -60]), point(-12, -35, -3, [-31, -44, -50, -63]))
    assert deltas["delta/chosen"] == -2 and deltas["delta/rejected"] == -15 and deltas["delta/greedy"] == 2
    assert deltas["delta/others"] == pytest.approx(-2.0)
    assert deltas["delta/margin"] == 13
    assert deltas["delta/random"] == -3


@pytest.mark.slow
def test_real_model_finds_random_tokens_far_less_likely_than_the_chosen_answer(smollm2_tokenizer):

    from prefopt.model.loading import load_model, resolve_model_source

    model_cfg = preset("model", "smollm2_135m")
    tokenizer = smollm2_tokenizer
    model = load_model(model_cfg, resolve_model_source(model_cfg), len(tokenizer), seed=0)
    train = [make_pair(tokenizer, i, i + 2, 2 * i + 1) for i in range(4)]
    eval_pairs = [make_pair(tokenizer, 100 + i, 10 + 3 * i, i + 1) for i in range(2)]
    probes = build_probe_set(
        PreferenceData(train=train, eval=eval_pairs), 2, 0, len(tokenizer), set(tokenizer.all_special_ids)
    )
    metrics = evaluate_probes(model, probes, chunk_size=64, device="cpu", batch_size=6)
    assert metrics["dynamics/random/logp_mean"] < metrics["dynamics/chosen/logp_mean"] - 5  # nats per token
    assert metrics["dynamics/random/logp"] < metrics["dynamics/chosen/logp"] - 30
    assert metrics["dynamics/permuted/logp"] < metrics["dynamics/chosen/logp"]
    assert metrics["dynamics/greedy/logp"] >= metrics["dynamics/chosen/logp"]
    assert 0 < metrics["dynamics/mass/peakiness"] <= 1 and 0 < metrics["dynamics/mass/target_prob"] <= 1
