"""`prefopt eval` (a run dir, a checkpoint, a model dir) and `prefopt export` (model card, --push-to-hub) on a
tiny trained run: the eval of a run's final checkpoint is the run's own final eval, and every failure is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from prefopt.cli import main
from prefopt.observe.tracking import read_jsonl
from tests.helpers import command_fails, run_train

TINY = [
    "model=tiny_llama",
    "hardware=cpu",
    "trainer.micro_batch_size=2",
    "trainer.eval_batch_size=4",
    "trainer.lr=1e-3",
    "dataset.arith.num_train=16",
    "dataset.arith.num_eval=6",
    "trainer.greedy_eval_examples=4",
    "trainer.max_new_tokens=4",
    "dynamics.num_probes=3",
    "logger.wandb.mode=disabled",
]
STEPS = 3
QUIET = ["hardware=cpu", "logger.wandb.mode=disabled"]  # the eval command's own groups (not taken from the run)
TIES = ("eval/rewards/accuracies",)  # at step 0 every reward is 0 up to rounding: which side of 0 is noise


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished tiny run with checkpoints at step 2 (save_every) and step 3 (final)."""
    return run_train(
        tmp_path_factory.mktemp("trained") / "run",
        *TINY,
        f"trainer.max_steps={STEPS}",
        "trainer.save_every=2",
        "trainer.eval_every=2",
        "dynamics.every_n_steps=2",
        "loss=gate_dpo",
    )


def run_eval(out_dir: Path, *args: str) -> Path:
    """`prefopt eval ARGS hydra.run.dir=OUT_DIR` in this process; returns the eval's run dir."""
    argv = sys.argv
    try:
        assert main(["eval", *args, f"hydra.run.dir={out_dir}"]) == 0
    finally:
        sys.argv = argv
    return out_dir


def failed_eval(out_dir: Path, capsys, *args: str) -> str:
    """`prefopt eval ARGS` that must fail as a user error: exit code 2 and one line on stderr; returns that line."""
    code, stderr = command_fails(capsys, "eval", out_dir, *args)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("prefopt: error: ")
    return line


def eval_row(run_dir: Path, step: int) -> dict:
    [row] = [row for row in read_jsonl(run_dir / "metrics.jsonl") if row["step"] == step and "eval/loss" in row]
    return row


def assert_same_numbers(ours: dict, theirs: dict, prefix: str, skip: tuple = ()) -> None:
    keys = {key for key in theirs if key.startswith(prefix)}
    assert keys and keys == {key for key in ours if key.startswith(prefix)}
    for key in sorted(keys - set(skip)):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key


@pytest.mark.slow  # a whole eval (base model, then the policy) of a trained run
def test_eval_of_a_run_dir_is_the_runs_own_final_eval(trained_run, tmp_path):
    eval_dir = run_eval(tmp_path / "eval", str(trained_run), *QUIET)  # the positional shorthand for eval.policy=RUN_DIR
    for name in ("config.yaml", "overrides.yaml", "metrics.jsonl", "dynamics.jsonl", "summary.json", "dynamics.png"):
        assert (eval_dir / name).is_file(), name
    frozen = (eval_dir / "config.yaml").read_text()
    assert (
        f"policy: {trained_run.resolve()}/checkpoints/step-{STEPS:06d}" in frozen
    )  # the newest checkpoint, named exactly
    assert "name: dpo" in frozen and "kind: seq" in frozen  # the run's loss (gate_dpo), not the default

    assert_same_numbers(
        eval_row(eval_dir, STEPS), eval_row(trained_run, STEPS), "eval/"
    )  # incl. greedy accuracy, gate spread
    assert_same_numbers(
        eval_row(eval_dir, 0), eval_row(trained_run, 0), "eval/", skip=TIES
    )  # the baseline: the base model
    ours, theirs = (json.loads((run_dir / "summary.json").read_text()) for run_dir in (eval_dir, trained_run))
    assert_same_numbers(ours, theirs, "eval/")  # final eval, eval/delta/*, greedy accuracy before/after
    assert_same_numbers(ours, theirs, "delta/")  # probe deltas: the same probe set, base model to final
    assert ours["steps"] == STEPS and ours["policy"].endswith(f"step-{STEPS:06d}")
    probes = {row["step"]: row for row in read_jsonl(eval_dir / "dynamics.jsonl")}
    run_probes = {row["step"]: row for row in read_jsonl(trained_run / "dynamics.jsonl")}
    assert sorted(probes) == [0, STEPS]
    assert_same_numbers(probes[STEPS], run_probes[STEPS], "dynamics/")


@pytest.mark.slow  # a whole eval (base model, then the policy) of a trained run
def test_eval_of_a_checkpoint_uses_its_step_and_command_line_keys_win(trained_run, tmp_path, capsys):
    checkpoint = trained_run / "checkpoints" / "step-000002"
    eval_dir = run_eval(
        tmp_path / "eval", f"eval.policy={checkpoint}", "eval.baseline=false", "trainer.greedy_eval_examples=0", *QUIET
    )
    rows = [row for row in read_jsonl(eval_dir / "metrics.jsonl") if "eval/loss" in row]
    assert [row["step"] for row in rows] == [2]  # no baseline; logged at the checkpoint's own step
    assert "eval/greedy_accuracy" not in rows[0]  # the command line's key replaced the run's
    assert_same_numbers(
        {k: v for k, v in rows[0].items() if k != "eval/greedy_accuracy"},
        {k: v for k, v in eval_row(trained_run, 2).items() if k != "eval/greedy_accuracy"},
        "eval/",
    )
    assert "eval @ step 2" in capsys.readouterr().out  # the headline on stdout


@pytest.mark.slow  # a whole eval (base model, then the policy) of a trained run
def test_eval_of_an_exported_model_dir_against_its_base(trained_run, tmp_path):
    from prefopt.run.export import export_policy

    exported = export_policy(trained_run, tmp_path / "exported")
    # a plain model dir: the config is composed (model= names its base), so pass the run's settings
    eval_dir = run_eval(
        tmp_path / "eval", str(exported), *TINY, "loss=gate_dpo", f"trainer.max_steps={STEPS}", "dynamics.enabled=false"
    )
    ours = eval_row(eval_dir, STEPS)
    theirs = eval_row(trained_run, STEPS)
    for key in (
        "eval/loss",
        "eval/rewards/accuracies",
        "eval/rewards/margins",
        "eval/logps/chosen",
        "eval/greedy_accuracy",
    ):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key


@pytest.mark.slow  # torchrun, two CPU ranks with DeepSpeed's CPU accelerator
def test_eval_on_two_ranks_matches_the_runs_final_eval(trained_run, tmp_path):
    eval_dir = run_eval(
        tmp_path / "eval", str(trained_run), "hardware=cpu_2proc", "logger.wandb.mode=disabled", "eval.baseline=false"
    )
    assert_same_numbers(eval_row(eval_dir, STEPS), eval_row(trained_run, STEPS), "eval/")  # each rank scored a shard


@pytest.mark.slow  # two evals
def test_a_sweep_of_evals_is_a_sweep_report_reads(trained_run, tmp_path):
    from prefopt.observe.report import build_report

    checkpoints = ",".join(str(trained_run / "checkpoints" / name) for name in ("step-000002", "step-000003"))
    argv = sys.argv
    try:
        assert (
            main(
                [
                    "eval",
                    "-m",
                    f"eval.policy={checkpoints}",
                    *QUIET,
                    "dynamics.enabled=true",
                    "trainer.greedy_eval_examples=0",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}",
                ]
            )
            == 0
        )
    finally:
        sys.argv = argv
    rows, plot = build_report(tmp_path / "sweep")
    assert [(row["steps"], row["status"]) for row in rows] == [(2, "ok"), (3, "ok")]
    assert rows[1]["eval_accuracy"] == pytest.approx(eval_row(trained_run, STEPS)["eval/rewards/accuracies"], abs=1e-6)
    assert plot is not None and plot.is_file()  # the probe trajectories, base model to each checkpoint


@pytest.mark.parametrize(
    "policy, named",
    [
        ("/no/such/run", "eval.policy=/no/such/run: does not exist"),
        ("EMPTY_DIR", "no checkpoint found there"),
    ],
)
def test_a_bad_policy_path_is_one_clear_error(tmp_path, capsys, policy, named):
    if policy == "EMPTY_DIR":
        (tmp_path / "empty").mkdir()
        policy = str(tmp_path / "empty")
    line = failed_eval(tmp_path / "eval", capsys, policy, *TINY)
    assert named in line
    assert not (tmp_path / "eval" / "config.yaml").exists()  # failed before the run dir was frozen


def test_an_unknown_group_override_on_a_run_is_refused(trained_run, tmp_path, capsys):
    line = failed_eval(tmp_path / "eval", capsys, str(trained_run), "+experiment=squeeze_demo", *QUIET)
    assert "+experiment=squeeze_demo" in line and "one by one" in line


def test_export_writes_a_model_card_with_the_runs_numbers(trained_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(trained_run), "-o", str(out)]) == 0
    card = (out / "README.md").read_text()
    summary = json.loads((trained_run / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "| loss | `dpo` |" in card
    assert "beta=0.1" in card and "kind=seq" in card and "tau=0.05" in card  # loss hyperparameters and the gate
    assert f"| steps | {STEPS} (step-{STEPS:06d}) |" in card
    assert "16 train pairs / 6 eval pairs" in card
    assert "random tiny Llama" in card and "base_model" not in card  # no hub id to name in the metadata
    for key in ("eval/loss", "eval/rewards/accuracies", "eval/greedy_accuracy_after", "delta/chosen"):
        assert f"| {key} | {summary[key]:.6g} |" in card, key
    assert (out / "config.json").is_file() and "model card" in capsys.readouterr().out


def test_push_to_hub_offline_fails_in_one_line_and_keeps_the_export(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "exported"
    assert main(["export", str(trained_run), "-o", str(out), "--push-to-hub", "someone/tiny-dpo"]) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and "Traceback" not in stderr[0]
    assert stderr[0].startswith("prefopt: error: cannot push to the hub: offline")
    assert f"the export in {out} is complete locally" in stderr[0] and f"hf upload someone/tiny-dpo {out}" in stderr[0]
    assert (out / "README.md").is_file() and (out / "config.json").is_file()
    assert "# someone/tiny-dpo" in (out / "README.md").read_text()  # the card is titled for the repo


def test_push_to_hub_unreachable_fails_in_one_line(trained_run, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9"
    )  # nothing listens: connection refused
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    out = tmp_path / "exported"
    assert main(["export", str(trained_run), "-o", str(out), "--push-to-hub", "someone/tiny-dpo"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("prefopt: error: cannot push to the hub: it cannot be reached") and "\n" not in line
    assert "complete locally" in line
