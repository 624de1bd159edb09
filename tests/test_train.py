"""End to end through `prefopt train` with the tiny random model: run dir, metrics, checkpoint, W&B, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prefopt.conf import CONF_DIR
from prefopt.losses import LOSSES
from prefopt.observe.tracking import read_jsonl
from tests.helpers import read_wandb_run, run_train

TINY = [
    "model=tiny_llama",
    "trainer.micro_batch_size=2",
    "trainer.eval_batch_size=4",
    "trainer.lr=1e-3",
    "dataset.arith.num_train=16",
    "dataset.arith.num_eval=4",
    "trainer.greedy_eval_examples=4",
    "trainer.max_new_tokens=4",
]


def train_rows(run_dir):
    return [row for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row]


def assert_plot_draws_the_run(run_dir, train, evals):
    """`prefopt plot`'s figure of a real run: the loss panel's train line and eval points are metrics.jsonl's
    numbers, the probe panels sit below."""
    from prefopt.observe.curves import curves_figure, read_curves
    from prefopt.observe.plots import PANELS

    figure = curves_figure([read_curves(run_dir)])
    titles = [axis.get_title() for axis in figure.axes]
    assert {title for title, _, _ in PANELS} <= set(titles)
    train_line, eval_line = figure.axes[titles.index("loss")].get_lines()
    assert list(train_line.get_xdata()) == [row["step"] for row in train]
    assert list(train_line.get_ydata()) == [row["train/loss"] for row in train]
    assert list(eval_line.get_ydata()) == [row["eval/loss"] for row in evals]


ENGINES = [pytest.param("torch", id="torch"), pytest.param("deepspeed", id="deepspeed", marks=pytest.mark.slow)]


@pytest.mark.parametrize("engine", ENGINES)
def test_tiny_run_writes_the_whole_run_dir(tmp_path, engine):
    run_dir = run_train(
        tmp_path / "run",
        *TINY,
        f"hardware.engine={engine}",
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "trainer.save_every=2",
        "dynamics.every_n_steps=2",
        "dynamics.num_probes=3",
        "loss=gate_dpo",
    )
    for name in ("config.yaml", "overrides.yaml", "git_revision", "metrics.jsonl", "summary.json", "wandb_run_id"):
        assert (run_dir / name).is_file(), name
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = train_rows(run_dir)
    assert [row["step"] for row in train] == [1, 2, 3, 4]
    for key in (
        "train/loss",
        "train/logps/chosen",
        "train/logps/rejected",
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/rewards/margins",
        "train/rewards/accuracies",
        "train/logits/chosen",
        "train/logits/rejected",
        "train/grad_norm",
        "train/learning_rate",
        "train/tokens_per_s",
    ):
        assert all(math.isfinite(row[key]) for row in train), key
    evals = [row for row in rows if "eval/loss" in row]
    assert [row["step"] for row in evals] == [0, 2, 4]
    assert "eval/greedy_accuracy" in evals[0] and "eval/greedy_accuracy" in evals[-1]
    assert any("data/train/pairs" in row for row in rows)

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "steps",
        "eval/loss",
        "eval/delta/logps/chosen",
        "eval/delta/logps/rejected",
        "eval/greedy_accuracy_before",
        "eval/greedy_accuracy_after",
    ):
        assert key in summary, key

    from transformers import AutoModelForCausalLM

    if engine == "deepspeed":
        assert (run_dir / "checkpoints" / "step-000004" / "deepspeed").is_dir()
    final = run_dir / "checkpoints" / "step-000004" / "policy"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.num_hidden_layers == 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000004"

    dynamics = read_jsonl(run_dir / "dynamics.jsonl")
    assert [row["step"] for row in dynamics] == [0, 2, 4]  # step 0, intermediate, final
    for key in ("delta/chosen", "delta/rejected", "delta/others", "delta/greedy", "delta/margin"):
        assert math.isfinite(summary[key]), key
    assert (run_dir / "dynamics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_plot_draws_the_run(run_dir, train, evals)

    wandb_summary, history = read_wandb_run(run_dir)
    assert "delta/chosen" in wandb_summary["summary"] and "delta/others" in wandb_summary["summary"]
    assert any("dynamics/greedy/logp" in item for item in history)
    assert wandb_summary["state"] == "finished"
    assert wandb_summary["config"]["loss"]["name"] == "dpo" and wandb_summary["config"]["loss"]["gate"]["kind"] == "seq"
    assert all(0.0 <= row["train/gate/mean"] <= 1.0 for row in train)  # gate statistics every step
    assert "eval/delta/logps/chosen" in wandb_summary["summary"]
    logged = {key for item in history for key in item}
    assert {"train/loss", "train/logps/chosen", "eval/loss"} <= logged


def test_step_zero_dpo_loss_is_ln2(tmp_path):
    run_dir = run_train(tmp_path / "run", *TINY, "trainer.max_steps=1", "trainer.save_final=false")
    first_eval = next(row for row in read_jsonl(run_dir / "metrics.jsonl") if "eval/loss" in row)
    assert first_eval["step"] == 0
    assert first_eval["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train_rows(run_dir)[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, engine):
    common = [
        *TINY,
        f"hardware.engine={engine}",
        "trainer.max_steps=6",
        "trainer.eval_every=3",
        "trainer.save_every=3",
        "logger.wandb.mode=disabled",
    ]
    straight = run_train(tmp_path / "straight", *common)
    stopped = run_train(tmp_path / "stopped", *common, "trainer.stop_after=3")
    assert not (stopped / "summary.json").exists()
    assert [row["step"] for row in train_rows(stopped)] == [1, 2, 3]
    run_train(tmp_path / "stopped", *common, "trainer.resume=true")
    assert _same_metrics(straight, stopped)


def _same_metrics(first, second) -> bool:
    ignore = ("train/tokens_per_s", "train/tflops", "train/mfu")  # wall-clock dependent
    rows_a, rows_b = read_jsonl(first / "metrics.jsonl"), read_jsonl(second / "metrics.jsonl")
    assert len(rows_a) == len(rows_b)
    for row_a, row_b in zip(rows_a, rows_b):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            if key not in ignore:
                assert row_a[key] == pytest.approx(row_b[key], rel=1e-6, abs=1e-7), (row_a["step"], key)
    return True


def test_same_seed_gives_identical_metrics(tmp_path):
    common = [*TINY, "trainer.max_steps=3", "logger.wandb.mode=disabled", "trainer.save_final=false"]
    first = run_train(tmp_path / "a", *common)
    second = run_train(tmp_path / "b", *common)
    assert _same_metrics(first, second)
    third = run_train(tmp_path / "c", *common, "trainer.seed=1")
    assert train_rows(third)[-1]["train/loss"] != train_rows(first)[-1]["train/loss"]


def test_every_loss_preset_trains(tmp_path):
    """A sweep over every conf/loss preset (each registered loss, the gated and the weighted presets), 2 steps each."""
    from tests.helpers import run_sweep

    presets = sorted(path.stem for path in (CONF_DIR / "loss").glob("*.yaml") if path.stem != "weighted")  # no terms
    assert set(LOSSES) <= set(presets)
    job_dirs = run_sweep(
        tmp_path / "sweep",
        f"loss={','.join(presets)}",
        *TINY,
        "trainer.max_steps=2",
        "logger.wandb.mode=disabled",
        "trainer.save_final=false",
        "trainer.greedy_eval_examples=0",
        "dynamics.enabled=false",  # the losses are what this sweep checks: no probes
    )
    assert len(job_dirs) == len(presets)
    for job_dir in job_dirs:
        summary = json.loads((job_dir / "summary.json").read_text())
        finite = [value for key, value in summary.items() if isinstance(value, float)]
        assert finite and all(math.isfinite(value) for value in finite), job_dir


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: mixed precision, packed rows, on a real model's activations
def test_two_dpo_steps_on_smollm2(tmp_path, dtype):
    run_dir = run_train(
        tmp_path / "run",
        "model=smollm2_135m",
        f"model.dtype={dtype}",
        "trainer.max_steps=2",
        "trainer.micro_batch_size=2",
        "dataset.arith.num_train=8",
        "dataset.arith.num_eval=4",
        "dataset.max_length=64",
        "dataset.max_prompt_length=48",
        "trainer.greedy_eval_examples=4",
        "trainer.eval_batch_size=4",
        "trainer.lr=1e-5",
        "trainer.save_final=false",
    )
    train = train_rows(run_dir)
    assert train[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5 if dtype == "fp32" else 2e-2)
    assert all(math.isfinite(row["train/loss"]) for row in train)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["eval/greedy_accuracy_before"] <= 1.0
    assert torch.isfinite(torch.tensor(summary["eval/delta/logps/chosen"]))
    # a real model: correct answers are far likelier per token than random tokens
    first_probe = read_jsonl(run_dir / "dynamics.jsonl")[0]
    assert first_probe["dynamics/chosen/logp_mean"] > first_probe["dynamics/random/logp_mean"] + 5
