"""Real DeepSpeed on CPU (gloo): 2-rank runs through torchrun, ZeRO 0 and 3, 1 vs 2 ranks, kill + resume, failures.

The first DeepSpeed start on a machine compiles a small shared-memory op (~45 s, cached after).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefopt.observe.tracking import read_jsonl
from tests.helpers import read_wandb_run, run_train

pytestmark = pytest.mark.slow

TINY = [
    "model=tiny_llama",
    "trainer.eval_batch_size=4",
    "trainer.lr=1e-3",
    "dataset.arith.num_train=32",
    "dataset.arith.num_eval=4",
    "trainer.greedy_eval_examples=0",
    "dynamics.num_probes=2",
    "trainer.warmup_steps=0",
]
REPO = Path(__file__).resolve().parents[1]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row}


def prefopt_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prefopt.cli", "train", *args],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("zero_stage, dtype", [(0, "fp32"), (3, "fp32"), (3, "bf16")])
def test_two_ranks_train_end_to_end(tmp_path, zero_stage, dtype):
    run_dir = run_train(
        tmp_path / "run",
        *TINY,
        "hardware=cpu_2proc",
        f"hardware.zero_stage={zero_stage}",
        f"model.dtype={dtype}",
        "trainer.max_steps=3",
        "trainer.micro_batch_size=2",
        "dynamics.every_n_steps=2",
    )
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [row["step"] for row in rows if "train/loss" in row]
    assert steps == [1, 2, 3]  # written once, by rank 0
    assert rows[1]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6 if dtype == "fp32" else 1e-3)
    assert train_losses(run_dir)[1] == pytest.approx(math.log(2), abs=1e-6 if dtype == "fp32" else 1e-3)
    assert all(math.isfinite(value) for value in train_losses(run_dir).values())
    summary, history = read_wandb_run(run_dir)
    assert summary["state"] == "finished" and "delta/chosen" in summary["summary"]
    assert {"train/loss", "train/grad_norm", "dynamics/chosen/logp"} <= {key for item in history for key in item}
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step-000003" / "policy")
    assert exported.model.embed_tokens.weight.shape[0] > 0  # gathered whole, not a ZeRO-3 shard


def test_one_rank_and_two_ranks_agree_on_the_same_global_batch(tmp_path):
    common = [
        *TINY,
        "trainer.max_steps=3",
        "logger.wandb.mode=disabled",
        "trainer.save_final=false",
        "dynamics.enabled=false",
        "reference.precompute=false",
    ]
    one_torch = train_losses(run_train(tmp_path / "torch1", *common, "hardware=cpu", "trainer.micro_batch_size=4"))
    one_ds = train_losses(
        run_train(tmp_path / "ds1", *common, "hardware=cpu", "hardware.engine=deepspeed", "trainer.micro_batch_size=4")
    )
    two_ds = train_losses(run_train(tmp_path / "ds2", *common, "hardware=cpu_2proc", "trainer.micro_batch_size=2"))
    # the reference cache computed by both ranks (each a shard, then gathered) gives the same losses
    two_cached = train_losses(
        run_train(
            tmp_path / "ds2c",
            *common,
            "hardware=cpu_2proc",
            "trainer.micro_batch_size=2",
            "reference.precompute=auto",
            f"reference.cache_dir={tmp_path / 'cache'}",
        )
    )
    for step in (1, 2, 3):
        assert one_ds[step] == pytest.approx(one_torch[step], rel=1e-5), step
        assert two_ds[step] == pytest.approx(one_torch[step], rel=1e-4), step
        assert two_cached[step] == pytest.approx(two_ds[step], rel=1e-5), step


def test_killed_two_rank_run_resumes_exactly(tmp_path):
    common = [
        *TINY,
        "hardware=cpu_2proc",
        "trainer.micro_batch_size=2",
        "trainer.max_steps=40",
        "trainer.save_every=4",
        "logger.wandb.mode=disabled",
        "dynamics.enabled=false",
        "trainer.eval_every=0",
    ]
    straight = run_train(tmp_path / "straight", *common)

    killed_dir = tmp_path / "killed"
    process = prefopt_process(*common, f"hydra.run.dir={killed_dir}")
    latest = killed_dir / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # parent, torchrun and both workers, no chance to clean up
    process.wait(timeout=30)
    assert latest.exists(), "no checkpoint was written before the deadline"
    assert not (killed_dir / "summary.json").exists(), "the run finished before it could be killed; make it longer"

    run_train(killed_dir, *common, "trainer.resume=true")
    resumed, expected = train_losses(killed_dir), train_losses(straight)
    assert sorted(resumed) == list(range(1, 41))
    for step in range(1, 41):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def held_out_rows(run_dir: Path, file: str, step: int) -> dict:
    [row] = [
        row
        for row in read_jsonl(run_dir / file)
        if row["step"] == step and any(key.startswith(("eval/", "dynamics/")) for key in row)
    ]
    return {key: value for key, value in row.items() if key.startswith(("eval/", "dynamics/"))}


def assert_same_token_views(one: Path, two: Path) -> None:
    """The per-token probe table (dynamics.token_views, gathered padded over ranks) of a 2-rank run equals one
    rank's: the same rows in the same order, the same values at step 0 and after two steps up to the runs' own
    rounding (the greedy token may only differ where the runs' rounding breaks a near-tie, so it is compared at 0)."""
    rows_one, rows_two = read_jsonl(one / "token_views.jsonl"), read_jsonl(two / "token_views.jsonl")
    place = lambda row: (row["step"], row["probe"], row["kind"], row["position"])  # noqa: E731
    assert [place(row) for row in rows_two] == [place(row) for row in rows_one] and rows_one
    for row_one, row_two in zip(rows_one, rows_two):
        tolerance = dict(rel=1e-5, abs=1e-5) if row_one["step"] == 0 else dict(rel=1e-3, abs=1e-4)
        assert row_two["logp"] == pytest.approx(row_one["logp"], **tolerance), place(row_one)
        assert row_two["delta"] == pytest.approx(row_one["delta"], **tolerance), place(row_one)
        if row_one["step"] == 0 or row_one["kind"] != "greedy":
            assert row_two["token_id"] == row_one["token_id"], place(row_one)


def test_eval_probes_and_greedy_split_over_two_ranks_match_one_rank(tmp_path):
    """Each rank scores a shard of the eval pairs, probes and greedy prompts (prefopt/train/sharding.py). 5 eval pairs
    in batches of 2 and 3 probes one per batch: rank 1 runs a padding batch in every pass. Under ZeRO-3 with
    every parameter partitioned (persistence threshold 0, so each module call gathers collectively) and small
    log-prob chunks (ranks score different token counts), unequal forwards or head calls would hang or fail."""
    gather_everything = tmp_path / "gather_everything.yaml"
    gather_everything.write_text("zero_optimization:\n  stage3_param_persistence_threshold: 0\n")
    common = [
        "model=tiny_llama",
        "loss=gate_dpo",
        "trainer.lr=1e-3",
        "trainer.warmup_steps=0",
        "dataset.arith.num_train=32",
        "dataset.arith.num_eval=5",
        "trainer.eval_batch_size=2",
        "trainer.greedy_eval_examples=5",
        "trainer.max_new_tokens=4",
        "dynamics.num_probes=3",
        "dynamics.batch_size=1",
        "dynamics.generate=true",
        "dynamics.num_generate=3",
        "dynamics.max_new_tokens=4",
        "trainer.logp_chunk_size=8",
        "trainer.max_steps=2",
        "logger.wandb.mode=disabled",
        "trainer.save_final=false",
        "reference.precompute=false",
    ]
    one = run_train(tmp_path / "one", *common, "hardware=cpu", "trainer.micro_batch_size=4")
    for zero_stage in (0, 3):
        two = run_train(
            tmp_path / f"zero{zero_stage}",
            *common,
            "hardware=cpu_2proc",
            "trainer.micro_batch_size=2",
            f"hardware.zero_stage={zero_stage}",
            f"hardware.deepspeed_config={gather_everything}",
        )
        for file in ("metrics.jsonl", "dynamics.jsonl"):
            expected, actual = held_out_rows(one, file, 0), held_out_rows(two, file, 0)
            assert actual.keys() == expected.keys() and expected
            for key, value in expected.items():  # the same initial weights: only float rounding may differ
                assert actual[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (zero_stage, file, key)
            final_expected, final_actual = held_out_rows(one, file, 2), held_out_rows(two, file, 2)
            for key, value in final_expected.items():  # two training steps later: the runs' own rounding too
                assert final_actual[key] == pytest.approx(value, rel=1e-3, abs=1e-4), (zero_stage, file, key)
        assert_same_token_views(one, two)
    assert "eval/greedy_accuracy" in held_out_rows(one, "metrics.jsonl", 0)
