"""TRL-compatible metric names and definitions (prefopt/train/metrics.py), what reaches W&B (names, one
generations table per kind, system metrics, console, config, summary) and readable plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.core.distributed import DistInfo
from prefopt.core.errors import ConfigError
from prefopt.core.runfiles import GENERATIONS_FILE, METRICS_FILE
from prefopt.data.layout import build_batch
from prefopt.model.logps import sequence_logps
from prefopt.observe.metric_names import renamed_metric, with_current_names
from prefopt.observe.tracking import Tracker, read_jsonl, wandb_records
from prefopt.run.config import validate_config
from prefopt.train.metrics import finish_token_means, mean_metrics, pair_metrics
from tests.helpers import read_wandb_run, run_train
from tests.test_config import compose_config
from tests.test_logps_models import VOCAB, tiny_model

TRL_NAMES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


def random_ids(generator: torch.Generator, length: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=generator).tolist()


def two_pairs():
    """(prompt, chosen, rejected) x 2 with different lengths, and the layout groups: chosen rows 0..1, rejected 2..3."""
    generator = torch.Generator().manual_seed(3)
    pairs = [
        (random_ids(generator, 5), random_ids(generator, 4), random_ids(generator, 7)),
        (random_ids(generator, 3), random_ids(generator, 6), random_ids(generator, 2)),
    ]
    groups = [
        (prompt, [(index, chosen), (index + len(pairs), rejected)])
        for index, (prompt, chosen, rejected) in enumerate(pairs)
    ]
    return pairs, groups


def hand_mean_logit(model, prompt: list[int], response: list[int]) -> tuple[float, int]:
    """(sum over the response's tokens of the model's own logits averaged over the vocabulary, tokens): the
    logits that predict the response tokens are those at positions len(prompt)-1 ... len(ids)-2."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float()
    predicting = logits[len(prompt) - 1 : len(prompt) + len(response) - 1]
    return float(predicting.mean(dim=-1).sum()), len(response)


@pytest.mark.parametrize("kind,batching", [("llama", "packed"), ("llama", "padded"), ("gemma2", "padded")])
@torch.no_grad()
def test_logits_metrics_equal_a_hand_computation(kind, batching):
    """logits/* = the mean over every response token of the batch of the mean logit over the vocabulary,
    as TRL's fused head computes it (after the model's own post-processing: gemma2 soft-caps its logits)."""
    model = tiny_model(kind).eval()
    pairs, groups = two_pairs()
    batch = build_batch(groups, 0, batching, 10**6)
    policy = sequence_logps(model, batch, chunk_size=3)  # chunks cross response boundaries
    assert policy.mean_logits is not None and not policy.mean_logits.requires_grad
    rewards = torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.4])
    columns = pair_metrics(policy, *rewards)
    metrics = finish_token_means({f"eval/{key}": float(value.float().mean()) for key, value in columns.items()}, "eval")
    for side, response_index in (("chosen", 1), ("rejected", 2)):
        sums, tokens = zip(*(hand_mean_logit(model, pair[0], pair[response_index]) for pair in pairs))
        assert metrics[f"eval/logits/{side}"] == pytest.approx(sum(sums) / sum(tokens), rel=1e-5, abs=1e-6)
        assert metrics[f"eval/lengths/{side}"] == pytest.approx(sum(tokens) / len(pairs))
    assert metrics["eval/rewards/accuracies"] == 0.5 and metrics["eval/rewards/margins"] == pytest.approx(
        (0.2 - 0.6) / 2
    )
    assert metrics["eval/rewards/chosen"] == pytest.approx(0.05) and metrics["eval/rewards/rejected"] == pytest.approx(
        0.25
    )
    assert metrics["eval/logps/chosen"] == pytest.approx(float(policy.summed[:2].mean()))
    assert not any("logit_sums" in key for key in metrics)  # the helper column is never logged
    assert set(f"eval/{name}" for name in TRL_NAMES) <= set(metrics)


def test_logits_are_token_weighted_over_the_whole_step():
    """A step split into micro batches of different lengths gives the number one pooled batch gives:
    total logit over total tokens, not the mean of the micro batches' means."""

    def part(logit_sums, lengths):
        size = len(lengths)
        return {
            "logit_sums/chosen": torch.tensor(logit_sums),
            "lengths/chosen": torch.tensor(lengths),
            "logit_sums/rejected": torch.zeros(size),
            "lengths/rejected": torch.zeros(size),
        }

    metrics = finish_token_means(
        mean_metrics([part([10.0], [2.0]), part([3.0, 3.0], [3.0, 3.0])], "train", DistInfo()), "train"
    )
    assert metrics["train/logits/chosen"] == pytest.approx(16.0 / 8.0)  # not (5 + 1) / 2
    assert metrics["train/logits/rejected"] == 0.0  # no tokens: 0.0, as TRL
    assert "train/logit_sums/chosen" not in metrics


def test_old_names_are_read_as_the_new_ones():
    assert renamed_metric("eval/rewards/accuracy") == "eval/rewards/accuracies"
    assert renamed_metric("eval/delta/rewards/margin") == "eval/delta/rewards/margins"
    assert renamed_metric("eval/rewards/accuracies") is None and renamed_metric("eval/greedy_accuracy") is None
    old = {"eval/rewards/accuracy": 0.75, "eval/rewards/margin": 1.5, "steps": 3}
    assert with_current_names(old) == {"eval/rewards/accuracies": 0.75, "eval/rewards/margins": 1.5, "steps": 3}
    both = {"eval/rewards/accuracy": 0.1, "eval/rewards/accuracies": 0.9}
    assert with_current_names(both) == {"eval/rewards/accuracies": 0.9}
    assert with_current_names({"train/lr": 3e-6, "step": 4}) == {"train/learning_rate": 3e-6, "step": 4}  # TRL's


def test_an_objective_under_an_old_name_is_refused_with_the_new_one():
    with pytest.raises(ConfigError, match=r"trainer\.objective=eval/rewards/accuracies"):
        validate_config(compose_config(["trainer.objective=eval/rewards/accuracy"]))
    validate_config(compose_config([]))  # the default is the new name


@pytest.mark.parametrize("override", ["logger.wandb.console=sometimes", "logger.wandb.system_sample_seconds=0.01"])
def test_wandb_settings_are_validated(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        validate_config(compose_config([override]))


def wandb_record_types(run_dir: Path) -> list[str]:
    from wandb.proto import wandb_internal_pb2

    kinds = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kinds.append(record.WhichOneof("record_type"))
    return kinds


def latest_table(run_dir: Path, key: str) -> dict:
    """The last version W&B wrote of table `key` (files/media/table/<key>_<step>_<hash>.table.json)."""
    *_, last = sorted(
        run_dir.glob(f"wandb/offline-run-*/files/media/table/{key}_*.table.json"),
        key=lambda path: path.stat().st_mtime_ns,
    )
    return json.loads(last.read_text())


def tracker_config(**wandb_settings) -> OmegaConf:
    cfg = compose_config(["model=tiny_llama", "hardware=cpu"])
    cfg.logger.wandb.merge_with(wandb_settings)
    return cfg


# one tracker's life in a fresh process, as in a run: W&B wraps the console once per process, and an earlier
# in-process run (other tests) leaves pytest's streams in a state where that capture cannot be checked
TRACKER_SCRIPT = """
import sys, time
from pathlib import Path
from prefopt.observe.tracking import Tracker
from tests.test_metrics import tracker_config
run_dir = Path(sys.argv[1])
tracker = Tracker(tracker_config(mode="offline", system_sample_seconds=0.1), run_dir)
try:
    print("a line for the W&B console log", flush=True)
    columns = ["prompt", "generation", "answer", "correct"]
    tracker.log_table("eval/generations", 0, columns, [["1+1=", "3", "2", False]])
    tracker.log(0, {"eval/rewards/accuracies": 0.5})
    tracker.log_table("eval/generations", 4, columns, [["1+1=", "2", "2", True]])
    tracker.log(4, {"eval/rewards/accuracies": 1.0})
    time.sleep(1.0)  # a few system-metric samples
    tracker.finish({"steps": 4, "eval/rewards/accuracies": 1.0})
finally:
    tracker.close()
"""


def test_wandb_gets_system_metrics_console_one_table_per_kind_and_the_summary(tmp_path):
    (tmp_path / "overrides.yaml").write_text(OmegaConf.to_yaml(["loss=gate_dpo"]))
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "hydra.yaml").write_text(
        OmegaConf.to_yaml({"hydra": {"runtime": {"choices": {"loss": "gate_dpo", "hydra/launcher": "basic"}}}})
    )
    (tmp_path / "git_revision").write_text("abc123\n")
    subprocess.run(
        [sys.executable, "-c", TRACKER_SCRIPT, str(tmp_path)], check=True, timeout=300, cwd=Path(__file__).parent.parent
    )
    columns = ["prompt", "generation", "answer", "correct"]
    summary, history = read_wandb_run(tmp_path)
    assert summary["summary"]["eval/rewards/accuracies"] == 1.0 and summary["summary"]["steps"] == 4
    assert summary["config"]["run"] == {
        "overrides": ["loss=gate_dpo"],
        "choices": {"loss": "gate_dpo"},
        "git_revision": "abc123",
    }
    assert summary["config"]["logger"]["wandb"]["console"] == "auto"
    logged = {
        key.split(".")[0] for item in history for key in item
    }  # a table is logged as `key._type`, `key.artifact_path`, ...
    assert "eval/generations" in logged and not any("generations_step" in key for key in logged)  # one key per kind
    table = latest_table(tmp_path, "eval/generations")
    assert table["columns"] == ["step", *columns]
    assert [row[0] for row in table["data"]] == [0, 4]  # the latest version holds every step's rows
    kinds = wandb_record_types(tmp_path)
    assert "stats" in kinds  # system metrics
    assert any(kind.startswith("output") for kind in kinds)  # console capture
    assert [row["step"] for row in read_jsonl(tmp_path / GENERATIONS_FILE)] == [0, 4]


def test_wandb_system_metrics_and_console_can_be_turned_off(tmp_path):
    tracker = Tracker(
        tracker_config(mode="offline", system_metrics=False, console="off", system_sample_seconds=0.1), tmp_path
    )
    try:
        print("not captured", flush=True)
        tracker.log(1, {"train/loss": 0.5})
        time.sleep(0.5)
        tracker.finish({"steps": 1})
    finally:
        tracker.close()
    kinds = wandb_record_types(tmp_path)
    assert "stats" not in kinds and not any(kind.startswith("output") for kind in kinds)


def test_a_resumed_run_keeps_the_tables_rows_up_to_its_checkpoint(tmp_path):
    cfg = tracker_config(mode="disabled")
    first = Tracker(cfg, tmp_path)
    first.log_table("dynamics/generations", 0, ["prompt", "generation"], [["a", "b"], ["c", "d"]])
    checkpoint_rows = dict(first.rows)
    first.log_table("dynamics/generations", 2, ["prompt", "generation"], [["a", "lost"]])  # after the checkpoint
    resumed = Tracker(cfg, tmp_path, resume_step=1, resume_rows=checkpoint_rows)
    assert [row["step"] for row in resumed.tables["dynamics/generations"]] == [0, 0]
    resumed.log_table("dynamics/generations", 2, ["prompt", "generation"], [["a", "kept"]])
    rows = read_jsonl(tmp_path / GENERATIONS_FILE)
    assert [(row["step"], row["generation"]) for row in rows] == [(0, "b"), (0, "d"), (2, "kept")]
    assert all(row["table"] == "dynamics/generations" for row in rows)


def test_a_tiny_run_logs_trl_names_to_metrics_jsonl_and_wandb(tmp_path):
    run_dir = run_train(
        tmp_path / "run",
        "model=tiny_llama",
        "trainer.micro_batch_size=2",
        "trainer.eval_batch_size=4",
        "dataset.arith.num_train=8",
        "dataset.arith.num_eval=4",
        "trainer.greedy_eval_examples=2",
        "trainer.max_new_tokens=2",
        "trainer.max_steps=2",
        "dynamics.enabled=false",
        "trainer.save_final=false",
    )
    rows = read_jsonl(run_dir / METRICS_FILE)
    train = [row for row in rows if "train/loss" in row]
    evals = [row for row in rows if "eval/loss" in row]
    for prefix, logged in (("train", train), ("eval", evals)):
        for name in TRL_NAMES:
            assert all(math.isfinite(row[f"{prefix}/{name}"]) for row in logged), (prefix, name)
        assert not any(renamed_metric(key) or "logit_sums" in key for row in logged for key in row)
    assert all(row["train/learning_rate"] >= 0 for row in train)  # TRL's name, not train/lr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "eval/rewards/accuracies" in summary and "eval/delta/rewards/margins" in summary
    wandb_summary, history = read_wandb_run(run_dir)
    logged = {key for item in history for key in item}
    assert {f"train/{name}" for name in TRL_NAMES} | {f"eval/{name}" for name in TRL_NAMES} <= logged
    assert wandb_summary["summary"]["eval/logits/chosen"] == pytest.approx(
        summary["eval/logits/chosen"]
    )  # final eval in the summary
    assert wandb_summary["config"]["run"]["overrides"][0] == "model=tiny_llama"
    assert [row["step"] for row in read_jsonl(run_dir / GENERATIONS_FILE)] == [
        0,
        0,
        2,
        2,
    ]  # greedy answers at both evals


def test_dynamics_plot_ticks_read_as_values_with_units_and_one_legend(tmp_path):
    """Log-probs that move in the fourth decimal around -112.3 must read as -112.3004, not as an offset
    '-1.123e2' above ticks 0.0002, 0.0004; steps are whole numbers; every panel says its unit."""
    from prefopt.observe.plots import PANELS, RunTrace, overlay_figure, save_png

    rows = [
        {
            "step": step,
            **{key: -112.3 - 1e-6 * step if key.endswith("/logp") else 0.5 + 1e-7 * step for _, key, _ in PANELS},
        }
        for step in (0, 500, 1000)
    ]
    figure = overlay_figure([RunTrace("loss=dpo", rows), RunTrace("loss=gate_dpo", rows[::-1])])
    figure.canvas.draw()
    panels = [axis for axis in figure.axes if axis.get_title()]
    assert len(panels) == len(PANELS)
    for axis in panels:
        for side in (axis.xaxis, axis.yaxis):
            assert side.get_offset_text().get_text() == "", axis.get_title()
            labels = [label.get_text() for label in side.get_ticklabels() if label.get_text()]
            assert labels and not any("e" in label.lower() or "+" in label for label in labels), (
                axis.get_title(),
                labels,
            )
        assert axis.get_xlabel() == "training step" and "(" in axis.get_ylabel()  # a unit: (nats), (0-1)
    [legend] = [axis.get_legend() for axis in figure.axes if axis.get_legend() is not None] + list(figure.legends)
    assert [text.get_text() for text in legend.get_texts()] == ["loss=dpo", "loss=gate_dpo"]
    save_png(figure, tmp_path / "dynamics.png")
