"""Multirun in one process (Hydra's basic launcher, the Optuna sweeper): a run dir and a W&B run per job in
one W&B group, the objective `prefopt train` returns, failing jobs, and no state leaking between jobs."""

from __future__ import annotations

import gc
import json
import struct
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prefopt.cli import main
from prefopt.observe.report import build_report
from prefopt.observe.tracking import read_jsonl
from tests.helpers import read_wandb_run, run_sweep, run_train

TINY = [
    "model=tiny_llama",
    "trainer.micro_batch_size=2",
    "trainer.eval_batch_size=4",
    "trainer.lr=1e-3",
    "dataset.arith.num_train=16",
    "dataset.arith.num_eval=4",
    "trainer.greedy_eval_examples=0",
    "trainer.max_steps=2",
    "trainer.save_final=false",
    "dynamics.num_probes=2",
]


def wandb_run_record(run_dir: Path):
    """The run record (group, display name, id) of the offline W&B run in run_dir, read from its .wandb log
    (LevelDB-style framing: 7-byte file header, 32 KiB blocks of chunks [crc32, length, type])."""
    from wandb.proto import wandb_internal_pb2

    [path] = list((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    raw, position, pending, block = path.read_bytes(), 7, b"", 32 * 1024
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        data, position = raw[position + 7 : position + 7 + length], position + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"no run record in {path}")


def train_losses(run_dir: Path) -> list[float]:
    return [row["train/loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row]


def live_models() -> int:
    from transformers import PreTrainedModel

    gc.collect()
    return sum(isinstance(obj, PreTrainedModel) for obj in gc.get_objects())


def test_sweep_over_two_losses_and_two_betas(tmp_path):
    sweep_dir = tmp_path / "sweep"
    jobs = run_sweep(sweep_dir, "loss=dpo,ipo", "loss.beta=0.05,0.1", *TINY)
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert (job / "metrics.jsonl").is_file() and (job / "summary.json").is_file(), job
        assert OmegaConf.load(job / "config.yaml").run_dir == str(job.resolve())

    records = [wandb_run_record(job) for job in jobs]
    assert {record.run_group for record in records} == {"sweep"}  # one group: the sweep dir's name
    assert len({record.run_id for record in records}) == 4
    names = [record.display_name for record in records]
    assert names[0].startswith("loss=dpo loss.beta=0.05") and names[3].startswith("loss=ipo loss.beta=0.1"), names
    for job in jobs:
        summary, _ = read_wandb_run(job)
        assert summary["state"] == "finished"
        assert summary["config"]["logger"]["wandb"]["group"] == "sweep"

    rows, _ = build_report(sweep_dir)
    assert [row["status"] for row in rows] == ["ok"] * 4
    assert [row["overrides"].split()[:2] for row in rows] == [
        ["loss=dpo", "loss.beta=0.05"],
        ["loss=dpo", "loss.beta=0.1"],
        ["loss=ipo", "loss.beta=0.05"],
        ["loss=ipo", "loss.beta=0.1"],
    ]
    assert main(["report", str(sweep_dir)]) == 0

    # nothing leaks from one job to the next: the last job trains exactly like the same run on its own,
    # no W&B run is left open and no model is left alive
    import wandb

    assert wandb.run is None
    assert live_models() == 0
    alone = run_train(tmp_path / "alone", "loss=ipo", "loss.beta=0.1", *TINY, "logger.wandb.mode=disabled")
    assert train_losses(alone) == pytest.approx(train_losses(jobs[3]), rel=1e-6)


def test_a_user_group_and_name_are_kept(tmp_path):
    [job] = run_sweep(
        tmp_path / "sweep", *TINY, "trainer.max_steps=1", "logger.wandb.group=mine", "logger.wandb.name=first"
    )
    record = wandb_run_record(job)
    assert (record.run_group, record.display_name) == ("mine", "first")


def test_train_returns_the_objective(tmp_path, monkeypatch):
    import prefopt.run.sweep as sweep

    real, returned = sweep.objective_value, []
    monkeypatch.setattr(
        sweep, "objective_value", lambda *args, **kwargs: returned.append(real(*args, **kwargs)) or returned[-1]
    )
    run_train(
        tmp_path / "run",
        *TINY,
        "logger.wandb.mode=disabled",
        "trainer.objective=eval/loss",
        "trainer.objective_direction=minimize",
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert returned == [pytest.approx(summary["eval/loss"])]


def test_an_objective_missing_from_the_summary_names_the_keys():
    from prefopt.core.errors import ConfigError
    from prefopt.run.sweep import objective_value

    cfg = OmegaConf.create({"trainer": {"objective": "eval/acc"}})
    assert objective_value(cfg, {"eval/loss": 0.5}, required=False) is None
    with pytest.raises(ConfigError, match="eval/loss"):
        objective_value(cfg, {"eval/loss": 0.5}, required=True)


def test_optuna_sweep_returns_the_best_job(tmp_path):
    sweep_dir = tmp_path / "optuna"
    jobs = run_sweep(
        sweep_dir,
        "+experiment=optuna_gate",
        "hydra.sweeper.n_trials=4",
        *TINY,
        "trainer.objective=eval/loss",
        "trainer.objective_direction=minimize",
        "logger.wandb.mode=disabled",
    )
    assert len(jobs) == 4
    objectives = [json.loads((job / "summary.json").read_text())["eval/loss"] for job in jobs]
    assert len(set(objectives)) == 4  # four different trials
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    best = min(range(4), key=lambda index: objectives[index])
    assert results.best_value == pytest.approx(objectives[best])
    best_config = OmegaConf.load(jobs[best] / "config.yaml")
    assert (best_config.loss.name, best_config.loss.gate.kind) == ("dpo", "seq")  # loss=gate_dpo
    for key, value in results.best_params.items():
        assert OmegaConf.select(best_config, key) == pytest.approx(value), key


def bad_data_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(8)] + [
        {"prompt": "q", "chosen": "same", "rejected": "same"}
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sweep_exit_code(sweep_dir: Path, *overrides: str) -> int:
    argv = sys.argv
    try:
        main(["train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"])
        return 0
    except SystemExit as exit:
        return exit.code
    finally:
        sys.argv = argv


def test_a_failing_job_is_recorded_and_the_sweep_continues(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    common = [
        *TINY,
        "dataset=local",
        f"dataset.path={bad_data_file(tmp_path)}",
        "logger.wandb.mode=disabled",
        "dynamics.enabled=false",
    ]
    assert sweep_exit_code(sweep_dir, "dataset.on_bad_row=error,skip", *common) == 1
    failed, ok = sweep_dir / "0", sweep_dir / "1"
    assert "line 9" in (failed / "error.txt").read_text() and "Traceback" in (failed / "error.txt").read_text()
    assert "line 9" in (failed / "cli.log").read_text()  # the job's log has it too
    assert (ok / "summary.json").is_file() and not (ok / "error.txt").exists()
    assert "line 9" in capsys.readouterr().err  # the sweep fails at its end, with the error
    rows, _ = build_report(sweep_dir)
    assert [row["status"] for row in rows] == ["failed", "ok"]


def test_a_failing_job_stops_the_sweep_when_asked(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    common = [
        *TINY,
        "dataset=local",
        f"dataset.path={bad_data_file(tmp_path)}",
        "logger.wandb.mode=disabled",
        "dynamics.enabled=false",
    ]
    assert sweep_exit_code(sweep_dir, "dataset.on_bad_row=error,skip", "sweep.continue_on_failure=false", *common) == 1
    assert (sweep_dir / "0" / "error.txt").is_file()
    assert not (sweep_dir / "1").exists()  # the second job never started
    err = capsys.readouterr().err
    assert "continue_on_failure=false stops the sweep" in err and "line 9" in err


def test_slurm_hardware_in_a_local_sweep_is_a_clear_error(tmp_path, capsys):
    assert (
        sweep_exit_code(tmp_path / "sweep", *TINY, "hardware=slurm_cpu_2proc", "sweep.continue_on_failure=false") == 1
    )
    assert "hydra/launcher=slurm" in capsys.readouterr().err
