"""A run remembers its data: a resume on changed data (labels flipped, rows appended: a moved eval split) is
refused in one line naming the file, before anything is written, unless trainer.resume_data_changed=allow,
which is then recorded. Cases feed the fault table (tests/test_faults.py's record)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from prefopt.cli import main
from prefopt.core.runfiles import DATA_FILE, LOCK_FILE
from prefopt.observe.report import build_report
from prefopt.train.checkpoint import load_trainer_state
from tests.helpers import run_train
from tests.test_faults import TINY, prefopt, record

ARGS = [
    *(arg for arg in TINY if not arg.startswith("dataset.")),
    "dataset=local",
    "dataset.eval_fraction=0.25",
    "dataset.cache_dir=null",
    "trainer.max_steps=4",
    "trainer.save_every=2",
    "logger.wandb.mode=disabled",
]
ROWS = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"} for i in range(16)]


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def flipped(rows: list[dict]) -> list[dict]:
    return [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in rows]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after its step-2 checkpoint, and its data file (restored by each test)."""
    root = tmp_path_factory.mktemp("dataid")
    data = root / "pairs.jsonl"
    write_rows(data, ROWS)
    run_dir = run_train(root / "run", *ARGS, f"dataset.path={data}", "trainer.stop_after=2")
    return run_dir, data


def files_in(run_dir: Path) -> dict[str, int]:
    """Every file under the run dir with its mtime (Hydra's own .hydra/ and log, and the run dir lock aside: they are
    written before prefopt looks at the data)."""
    return {
        str(path.relative_to(run_dir)): path.stat().st_mtime_ns
        for path in run_dir.rglob("*")
        if path.is_file() and ".hydra" not in path.parts and path.suffix != ".log" and path.name != LOCK_FILE
    }


def resume(run_dir: Path, data: Path, *extra: str):
    return prefopt(*ARGS, f"dataset.path={data}", f"hydra.run.dir={run_dir}", "trainer.resume=true", *extra)


def assert_refused(result, data: Path, *named: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("prefopt: error: ") and str(data) in message, message
    for text in (*named, "trainer.resume_data_changed=allow"):
        assert text in message, message
    return message


def test_the_checkpoint_and_the_run_dir_record_the_data(stopped_run):
    run_dir, data = stopped_run
    saved = load_trainer_state(run_dir / "checkpoints" / "step-000002")["data"]
    assert saved["train_pairs"] == 12 and saved["eval_pairs"] == 4 and saved["files"] == [str(data)]
    assert json.loads((run_dir / DATA_FILE).read_text()) == saved


def test_flipped_labels_refuse_the_resume_naming_the_file(stopped_run):
    run_dir, data = stopped_run
    before = files_in(run_dir)
    try:
        write_rows(data, flipped(ROWS))
        message = assert_refused(
            resume(run_dir, data), data, "the training pairs differ", "labels changed", "eval split differs"
        )
    finally:
        write_rows(data, ROWS)
    assert files_in(run_dir) == before  # refused before anything was written: no error.txt, config untouched
    record(
        "labels flipped between a run and its resume",
        "refused in the parent, one line naming the file; run dir untouched",
    )
    assert "step-000002" in message


def test_appended_rows_refuse_the_resume_as_a_moved_eval_split(stopped_run):
    run_dir, data = stopped_run
    before = files_in(run_dir)
    try:
        write_rows(
            data, ROWS + [{"prompt": f"What is {i} - 1?", "chosen": f"{i - 1}", "rejected": f"{i}"} for i in range(4)]
        )
        assert_refused(resume(run_dir, data), data, "eval split differs", "(4 held-out pairs at the checkpoint, 5 now)")
    finally:
        write_rows(data, ROWS)
    assert files_in(run_dir) == before
    record(
        "rows appended between a run and its resume (held-out split moves)",
        "refused in the parent, one line naming the file",
    )


def test_the_worker_refuses_too_when_the_parent_did_not_check(stopped_run, monkeypatch, capsys):
    """Belt and braces (sbatch jobs and requeues start workers without `prefopt train`'s parent)."""
    run_dir, data = stopped_run
    monkeypatch.setattr("prefopt.run.resume.refuse_changed_data", lambda cfg, checkpoint, data=None: None)
    copy = run_dir.parent / "worker_copy"
    shutil.copytree(run_dir, copy)
    argv = sys.argv
    try:
        write_rows(data, flipped(ROWS))
        with pytest.raises(SystemExit) as exit_info:
            main(["train", *ARGS, f"dataset.path={data}", f"hydra.run.dir={copy}", "trainer.resume=true"])
    finally:
        sys.argv = argv
        write_rows(data, ROWS)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        message.startswith("prefopt: error: ")
        and str(data) in message
        and "trainer.resume_data_changed=allow" in message
    )
    assert not (copy / "checkpoints" / "step-000004").exists()
    record("labels flipped, worker started without the parent's check", "the worker refuses before training a step")


def test_allow_resumes_on_changed_data_and_records_it(stopped_run):
    run_dir, data = stopped_run
    copy = run_dir.parent / "allow_copy"
    shutil.copytree(run_dir, copy)
    try:
        write_rows(data, flipped(ROWS))
        run_train(copy, *ARGS, f"dataset.path={data}", "trainer.resume=true", "trainer.resume_data_changed=allow")
    finally:
        write_rows(data, ROWS)
    assert "resume_data_changed: allow" in (copy / "config.yaml").read_text()
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["data/changed_at_step"] == 2
    recorded = json.loads((copy / DATA_FILE).read_text())
    assert recorded["changed_at_steps"] == [2]
    assert load_trainer_state(copy / "checkpoints" / "step-000004")["data"]["changed_at_steps"] == [2]
    assert any("resumed at step 2 on changed data" in path.read_text() for path in copy.glob("*.log"))
    record(
        "labels flipped, resume with trainer.resume_data_changed=allow",
        "resumes; change recorded in config, data.json, summary and the checkpoint",
    )


def test_an_interrupted_sweeps_report_lists_every_planned_job(tmp_path, capsys):
    """A real sweep (Hydra's multirun.yaml) stopped by its first job's failure (sweep.continue_on_failure=false): jobs
    1 to 3 never ran; job 2 is then marked running while a process holds its run dir lock."""
    sweep_dir = tmp_path / "sweep"
    args = [
        "model=tiny_llama",
        "hardware=cpu",
        "logger.wandb.mode=disabled",
        "trainer.max_steps=1",
        "dynamics.enabled=false",
        "trainer.greedy_eval_examples=0",
        "dataset.arith.num_train=8",
        "dataset.arith.num_eval=4",
        "sweep.continue_on_failure=false",
        "trainer.seed=0,1",
        "trainer.lr=100.0,1e-4",
    ]  # job 0 (seed 0, lr 100) is refused and stops the sweep
    argv = sys.argv
    try:
        with pytest.raises(SystemExit):
            main(["train", "-m", *args, f"hydra.sweep.dir={sweep_dir}"])
    finally:
        sys.argv = argv
    assert sorted(path.name for path in sweep_dir.iterdir() if path.name.isdigit()) == ["0"]
    rows, _ = build_report(sweep_dir)
    assert [(row["job"], row["status"]) for row in rows] == [
        (0, "failed"),
        (1, "never ran"),
        (2, "never ran"),
        (3, "never ran"),
    ]
    assert rows[0]["overrides"].endswith(
        "trainer.seed=0 trainer.lr=100.0"
    )  # failed before recording its overrides: as planned
    assert rows[3]["overrides"].endswith("trainer.seed=1 trainer.lr=0.0001")
    (sweep_dir / "2").mkdir()
    holder = os.open(sweep_dir / "2" / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # what a live job's prefopt train holds (prefopt/core/rundir.py)
        assert main(["report", str(sweep_dir)]) == 0
    finally:
        os.close(holder)
    out = capsys.readouterr().out
    assert "| running |" in out and "4 jobs, 1 failed, 1 running, 2 never ran" in out
    assert [row["status"] for row in build_report(sweep_dir)[0]] == [
        "failed",
        "never ran",
        "failed",
        "never ran",
    ]  # holder gone
    record("sweep stopped by its first job's failure", "report lists all 4 planned jobs: failed / running / never ran")


def test_an_unknown_architecture_is_one_line_exit_2(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "prefopt_mystery", "hidden_size": 8}))
    result = prefopt(
        "model=pythia_410m", f"model.path={model_dir}", "hardware=cpu", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert (
        message.startswith("prefopt: error: ")
        and str(model_dir / "config.json") in message
        and "'prefopt_mystery'" in message
    )
    record(
        "model dir with a model_type transformers does not know",
        "one line naming config.json and the model_type, exit 2",
    )


def test_an_architecture_with_its_own_code_needs_trust_remote_code(tmp_path):
    from omegaconf import OmegaConf

    from prefopt.core.errors import ModelNotFoundError
    from prefopt.model.loading import resolve_model_source

    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "prefopt_mystery", "auto_map": {"AutoModel": "x.Y"}})
    )
    model_cfg = OmegaConf.create({"source": "hub", "path": str(tmp_path), "trust_remote_code": False, "name": "custom"})
    with pytest.raises(ModelNotFoundError, match="model.trust_remote_code=true"):
        resolve_model_source(model_cfg)
    model_cfg.trust_remote_code = True
    assert resolve_model_source(model_cfg).kind == "dir"


def test_a_record_of_another_identity_version_is_not_compared(caplog):
    """A digest scheme changed by a later prefopt: equal data would read as changed, so the versions are compared
    first; another version warns that it cannot compare and resumes (refusing would block every resume across an
    upgrade, for no change of data); the same version with other digests is refused."""
    from prefopt.data.errors import DataError
    from prefopt.data.identity import IDENTITY_VERSION, check_resume_data

    current = {
        "version": IDENTITY_VERSION,
        "train": "a" * 64,
        "eval": "b" * 64,
        "train_pairs": 12,
        "eval_pairs": 4,
        "origin": "file pairs.jsonl",
        "files": [],
    }
    other_scheme = {**current, "version": IDENTITY_VERSION + 1, "train": "c" * 64, "eval": "d" * 64}
    with caplog.at_level("WARNING", logger="prefopt"):
        assert check_resume_data(other_scheme, current, "step-000002", "refuse") == []
    assert f"identity version {IDENTITY_VERSION + 1}" in caplog.text and "cannot be compared" in caplog.text
    with pytest.raises(DataError, match="the training pairs differ"):
        check_resume_data({**other_scheme, "version": IDENTITY_VERSION}, current, "step-000002", "refuse")


def test_resume_data_changed_choices_include_the_value_the_data_layer_acts_on():
    from prefopt.data.identity import ALLOW_CHANGED
    from prefopt.run.config import CHOICES

    assert ALLOW_CHANGED in CHOICES["trainer.resume_data_changed"]
