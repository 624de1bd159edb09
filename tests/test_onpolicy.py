"""The on-policy arith regime (dataset.arith.rejected_style=onpolicy; prefopt/data/arith.py picks the pairs,
prefopt/train/onpolicy.py samples them): which sample becomes the rejected response, what gives no pair, that the
prompts sampled from are the prompts trained on, that the samples are the config's alone (groups, seeds, the run's
random streams untouched), that the cache is keyed by the weights, and that a resumed run that draws its samples
again trains on exactly the same pairs. Two ranks drawing what one draws: tests/test_sharding.py."""

from __future__ import annotations

import json
import time

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.core.distributed import DistInfo
from prefopt.data.arith import OnPolicySamplesNeeded, arith_questions, generate_arith_rows, question_prompt
from prefopt.data.pipeline import build_preference_data
from prefopt.model.loading import ModelSource, build_byte_tokenizer
from prefopt.train.onpolicy import OnPolicySampler, known_fingerprint, sampled_tokens
from tests.helpers import run_train, tiny_byte_llama
from tests.test_config import compose_config

ONPOLICY = ["dataset.arith.rejected_style=onpolicy", "dataset.arith.num_train=6", "dataset.arith.num_eval=2"]


def arith_cfg(**onpolicy):
    cfg = compose_config(
        ["model=tiny_llama", *ONPOLICY] + [f"dataset.arith.onpolicy.{k}={v}" for k, v in onpolicy.items()]
    )
    return cfg


def test_the_first_wrong_sample_is_rejected_and_questions_without_one_give_no_pair():
    cfg = arith_cfg()
    questions, _ = arith_questions(cfg.dataset.arith, 0)
    answers = [str(a + b if op == "+" else a - b) for a, op, b in questions]
    samples = [[] for _ in questions]
    samples[0] = [f"it is {answers[0]}", "no idea", f"= {int(answers[0]) + 1}"]  # eval: right, then two wrong
    samples[1] = [f"{answers[1]}"]  # eval: only right answers
    samples[2] = []  # train: nothing usable
    samples[3] = ["the answer is 1000", f"x = {answers[3]}"]
    for index in range(4, len(questions)):
        samples[index] = [f"{int(answers[index]) + 2}"]
    train, eval_rows, counts = generate_arith_rows(cfg.dataset.arith, 0, samples)
    assert [row["rejected"] for row in eval_rows] == ["no idea"]  # the first wrong one, not a later one
    assert eval_rows[0]["chosen"] == f"{questions[0][0]} {questions[0][1]} {questions[0][2]} = {answers[0]}"  # the key
    assert counts["eval"].all_correct == 1 and counts["eval"].no_usable_sample == 0
    assert counts["train"].no_usable_sample == 1 and counts["train"].all_correct == 0
    assert counts["train"].dropped_questions == [question_prompt(*questions[2])]
    assert [row["rejected"] for row in train][:1] == ["the answer is 1000"] and len(train) == 5
    # chosen=sample: the first correct sample where one was drawn, else the key
    cfg.dataset.arith.onpolicy.chosen = "sample"
    train, eval_rows, counts = generate_arith_rows(cfg.dataset.arith, 0, samples)
    assert eval_rows[0]["chosen"] == f"it is {answers[0]}" and train[0]["chosen"] == f"x = {answers[3]}"
    assert train[1]["chosen"].endswith(f"= {answers[4]}")  # no correct sample: the key
    assert counts["eval"].chosen_sampled == 1 and counts["train"].chosen_sampled == 1


def test_onpolicy_asks_the_near_regimes_questions_and_needs_the_samples():
    cfg = arith_cfg()
    near = OmegaConf.merge(cfg.dataset.arith, {"rejected_style": "near"})
    near_train, near_eval, _ = generate_arith_rows(near, 3)
    questions, _ = arith_questions(cfg.dataset.arith, 3)
    assert [question_prompt(*q) for q in questions] == [row["prompt"] for row in near_eval + near_train]
    with pytest.raises(OnPolicySamplesNeeded, match="start the run"):
        generate_arith_rows(cfg.dataset.arith, 3)


def test_the_prompt_sampled_from_is_the_prompt_a_pair_starts_with():
    cfg = arith_cfg()
    tokenizer = build_byte_tokenizer()
    sampler = OnPolicySampler(cfg.model, cfg.dataset, 0, ModelSource("tiny", "", "tiny"), tokenizer)
    samples = [["wrong 1"] for _ in sampler.prompts]
    data = build_preference_data(OmegaConf.merge(cfg.dataset, {"cache_dir": None}), tokenizer, 0, samples=samples)
    pairs = data.eval + data.train
    assert [pair.prompt for pair in pairs] and all(
        sampler.prompt_ids[index] == pair.prompt_ids for index, pair in enumerate(pairs)
    )
    assert data.stats["train/onpolicy_all_correct"] == 0 and data.stats["train/pairs"] == 6


def test_samples_are_the_configs_alone_and_leave_the_runs_random_streams_alone():
    cfg = arith_cfg(samples=3, max_new_tokens=5, questions_per_batch=3)
    tokenizer = build_byte_tokenizer()
    model = tiny_byte_llama(tokenizer).eval()
    sampler = OnPolicySampler(cfg.model, cfg.dataset, 0, ModelSource("tiny", "", "tiny"), tokenizer)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = sampled_tokens(model, tokenizer, sampler, 0, DistInfo(), "cpu")
    assert torch.equal(torch.get_rng_state(), before)  # the run's stream: as if nothing was drawn
    torch.manual_seed(999)  # another global state changes nothing: each group seeds itself
    assert sampled_tokens(model, tokenizer, sampler, 0, DistInfo(), "cpu") == first
    assert len(first) == 8 and all(len(question) == 3 for question in first)
    assert first[0][0] != first[0][1]  # the copies of a question are separate draws
    assert sampled_tokens(model, tokenizer, sampler, 1, DistInfo(), "cpu") != first  # another seed, other samples


def test_the_cache_is_keyed_by_the_weights_bytes(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    cfg = compose_config(["model=hf", f"model.path={model_dir}", *ONPOLICY])
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"weights one")
    cfg.model.cache_dir = str(tmp_path / "digests")
    source = ModelSource("dir", str(model_dir), "my-model")
    tokenizer = build_byte_tokenizer()
    sampler = OnPolicySampler(cfg.model, cfg.dataset, 0, source, tokenizer)
    first = sampler.cache_path(known_fingerprint(cfg.model, 0, source, DistInfo()))
    time.sleep(0.05)  # past the file clock's tick, so the digest memo sees the write (core/fileutil.py file_identity)
    weights.write_bytes(b"weights two")  # the same name, size and config: other weights
    second = sampler.cache_path(known_fingerprint(cfg.model, 0, source, DistInfo()))
    assert first != second and first.parent == second.parent
    # and what is cached under a key is read back only for the same questions
    sampler.write_cache(first, [["a"]] * len(sampler.prompts))
    assert sampler.read_cache(first) == [["a"]] * len(sampler.prompts)
    other = OnPolicySampler(cfg.model, cfg.dataset, 1, source, tokenizer)  # seed 1: other questions
    assert other.read_cache(first) is None


@pytest.mark.slow  # three tiny runs that sample (~25 s)
def test_a_resumed_run_that_samples_again_trains_on_the_same_pairs(tmp_path):
    onpolicy = [
        "model=tiny_llama",
        "hardware=cpu",
        "dataset.arith.rejected_style=onpolicy",
        "dataset.arith.num_train=24",
        "dataset.arith.num_eval=4",
        "dataset.arith.onpolicy.samples=8",
        "dataset.arith.onpolicy.max_new_tokens=24",
        "trainer.max_steps=4",
        "trainer.micro_batch_size=2",
        "trainer.save_every=2",
        "logger.wandb.mode=disabled",
        "dynamics.enabled=false",
    ]
    straight = run_train(tmp_path / "straight", *onpolicy, f"dataset.cache_dir={tmp_path / 'cache'}")
    assert list((tmp_path / "cache").glob("onpolicy-*.json"))  # drawn once, cached
    # no cache: the stopped run and its resume each draw the samples anew
    stopped = run_train(tmp_path / "stopped", *onpolicy, "dataset.cache_dir=null", "trainer.stop_after=2")
    run_train(stopped, *onpolicy, "dataset.cache_dir=null", "trainer.resume=true")
    rows = {
        name: {
            row["step"]: row["train/loss"]
            for row in map(json.loads, open(run / "metrics.jsonl"))
            if "train/loss" in row
        }
        for name, run in (("straight", straight), ("resumed", stopped))
    }
    assert sorted(rows["resumed"]) == [1, 2, 3, 4]
    assert rows["resumed"] == pytest.approx(rows["straight"], rel=1e-6)
    data = json.loads((straight / "data.json").read_text())
    assert data == json.loads((stopped / "data.json").read_text())
