"""Every user error is one clear message: it names the file / line / key / path, says how to fix it,
exits non-zero, and prints no traceback. Cases that need the exit code run `prefopt train` as a
subprocess; the rest run in-process."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefopt.cli import main
from prefopt.core.errors import ConfigError
from prefopt.core.fileutil import atomic_write_text
from prefopt.data import DataError, PreferenceData, build_preference_data
from prefopt.run.config import validate_config
from tests.helpers import dataset_node
from tests.test_config import compose_config

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model=tiny_llama",
    "hardware=cpu",
    "logger.wandb.mode=disabled",
    "trainer.max_steps=2",
    "dynamics.num_probes=2",
    "trainer.greedy_eval_examples=0",
]
ROWS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]


def prefopt_train(*overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefopt.cli", "train", *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def assert_one_clear_error(result: subprocess.CompletedProcess, *named: str, exit_code: int = 2) -> str:
    """The last stderr line is the error; returns it."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == exit_code, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("prefopt: error: "), result.stderr[-3000:]
    for text in named:
        assert text in message, message
    return message


def jsonl_with_line(tmp_path: Path, line_number: int, raw_line: bytes, name: str = "pairs.jsonl") -> Path:
    """ROWS as JSON lines, with line `line_number` (1-based) replaced by raw bytes."""
    lines = [json.dumps(row).encode() for row in ROWS]
    lines[line_number - 1] = raw_line
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def local_cfg(path: Path, **overrides):
    return dataset_node(name="local", path=str(path), **overrides)


# ---------------------------------------------------------------- data files


def test_non_utf8_line_names_file_line_offset_and_fix(tmp_path):
    path = jsonl_with_line(tmp_path, 5, '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'.encode("latin-1"))
    result = prefopt_train(*TINY, "dataset=local", f"dataset.path={path}", f"hydra.run.dir={tmp_path}/run")
    message = assert_one_clear_error(
        result, str(path), "line 5:", "not UTF-8", "byte offset", "re-encode the file as UTF-8"
    )
    offset = path.read_bytes().index(b"\xe9")
    assert f"byte offset {offset} " in message


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = jsonl_with_line(tmp_path, 8, b'{"prompt": "q", "chosen": ')
    result = prefopt_train(*TINY, "dataset=local", f"dataset.path={path}", f"hydra.run.dir={tmp_path}/run")
    assert_one_clear_error(result, str(path), "line 8:", "not valid JSON", "dataset.on_bad_row=skip")


@pytest.mark.parametrize("bad_line", [1, 4])  # a bad first line must not decide the format
def test_skip_mode_skips_unreadable_lines_and_counts_them(tmp_path, byte_tokenizer, caplog, bad_line):
    path = jsonl_with_line(tmp_path, bad_line, b"not json at all")
    path.write_bytes(
        path.read_bytes().replace(json.dumps(ROWS[6]).encode(), b'{"prompt": "\xff"}')
    )  # and a latin-1 line 7
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        data = build_preference_data(local_cfg(path, on_bad_row="skip", eval_fraction=0.2), byte_tokenizer, seed=0)
    assert data.row_format == "strings"
    assert data.stats["train/skipped_bad_rows"] + data.stats["eval/skipped_bad_rows"] == 2
    assert len(data.train) + len(data.eval) == len(ROWS) - 2
    assert f"line {bad_line}: not valid JSON" in caplog.text and "line 7: not UTF-8" in caplog.text


def test_positions_count_from_one_like_an_editor(tmp_path, byte_tokenizer):
    # a blank line 2 keeps later line numbers true to the file; a .json list's rows are counted from 1
    lines = [json.dumps(row) for row in ROWS[:3]] + [json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"})]
    path = tmp_path / "pairs.jsonl"
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl \(.*\), line 5: chosen and rejected responses are identical"):
        build_preference_data(local_cfg(path, eval_fraction=0.25), byte_tokenizer, seed=0)
    listed = tmp_path / "pairs.json"
    listed.write_text(json.dumps(ROWS[:3] + [{"prompt": "q", "chosen": "same", "rejected": "same"}]))
    with pytest.raises(DataError, match=r"pairs\.json \(.*\), row 4: chosen and rejected"):
        build_preference_data(local_cfg(listed, eval_fraction=0.25), byte_tokenizer, seed=0)


# ---------------------------------------------------------------- probe set


def test_identical_prompts_probe_without_other_prompt_responses(tmp_path, byte_tokenizer, caplog):
    from prefopt.model.loading import ModelSource, load_model
    from prefopt.train.dynamics import OTHER_PROMPT_TYPES, build_probe_set, dynamics_deltas, evaluate_probes

    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps(dict(row, prompt="the same question")) + "\n" for row in ROWS))
    data: PreferenceData = build_preference_data(local_cfg(path, eval_fraction=0.2), byte_tokenizer, seed=0)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        probes = build_probe_set(data, 2, 0, len(byte_tokenizer), set(byte_tokenizer.all_special_ids))
    assert (
        not set(OTHER_PROMPT_TYPES) & set(probes.responses) and "leaving out other_train and other_test" in caplog.text
    )
    model = load_model(
        compose_config(["model=tiny_llama"]).model, ModelSource("tiny", "", "tiny"), len(byte_tokenizer), seed=0
    )
    metrics = evaluate_probes(model, probes, chunk_size=64, device="cpu", batch_size=4)
    assert metrics["dynamics/others/logp"] == pytest.approx(
        (metrics["dynamics/permuted/logp"] + metrics["dynamics/random/logp"]) / 2
    )
    assert "delta/others" in dynamics_deltas(metrics, metrics) and "delta/other_train" not in dynamics_deltas(
        metrics, metrics
    )


# ---------------------------------------------------------------- config keys


@pytest.mark.parametrize(
    "override, named",
    [
        ("trainer.lr=nan", "trainer.lr=nan is not a finite number"),
        ("trainer.lr=inf", "trainer.lr=inf is not a finite number"),
        ("trainer.max_grad_norm=-inf", "trainer.max_grad_norm=-inf is not a finite number"),
        ("trainer.adam_betas=[0.9,nan]", "trainer.adam_betas[1]=nan"),
        ("loss.beta=nan", "loss.beta=nan"),
        ("trainer.lr=2.0", "trainer.lr=2.0 is far too large: AdamW"),
        ("+trainer.max_step=3", "trainer.max_step is not a known config key (did you mean trainer.max_steps?)"),
        ("+model.tiny.hiden_size=8", "did you mean model.tiny.hidden_size?"),
        ("+loss.bta=0.1", "loss.bta is not a hyperparameter of loss 'dpo'"),
        ("model.path=/some/dir", "model.path=/some/dir is not used by model=tiny_llama (source=tiny"),
    ],
)
def test_bad_config_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(["model=tiny_llama", override]))
    assert named in str(error.value)


def test_unknown_key_fails_in_the_parent_in_one_line(tmp_path):
    result = prefopt_train(*TINY, "+trainer.max_step=3", f"hydra.run.dir={tmp_path}/run")
    assert_one_clear_error(result, "trainer.max_step", "did you mean trainer.max_steps?")
    assert not (tmp_path / "run" / "config.yaml").exists()


# ---------------------------------------------------------------- files and the run dir


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "written.txt", "x")
        with open(tmp_path / "opened.txt", "w") as handle:
            handle.write("x")
    finally:
        os.umask(previous)
    assert (
        (tmp_path / "written.txt").stat().st_mode & 0o777
        == (tmp_path / "opened.txt").stat().st_mode & 0o777
        == 0o666 & ~umask
    )


def test_run_dir_that_cannot_be_created_is_one_message(tmp_path):
    result = prefopt_train(*TINY, "hydra.run.dir=/proc/prefopt-test/run")  # /proc refuses new dirs, even to root
    assert_one_clear_error(result, "hydra.run.dir=/proc/prefopt-test/run", "cannot create or write this directory")


def run_main(*args: str) -> int:
    argv = sys.argv
    try:
        return main(["train", *args])
    except SystemExit as exit:
        return exit.code
    finally:
        sys.argv = argv


def test_read_only_run_dir_is_one_message(tmp_path, monkeypatch, capsys):
    def read_only(*args, **kwargs):  # root writes through chmod 0555, so simulate a read-only mount
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "run"))

    monkeypatch.setattr("prefopt.run.app.tempfile.TemporaryFile", read_only)
    assert run_main(*TINY, f"hydra.run.dir={tmp_path}/run") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"hydra.run.dir={tmp_path}/run" in err and "Read-only file system" in err


def test_disk_full_while_writing_is_one_message(tmp_path, monkeypatch, capsys):
    def disk_full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("prefopt.run.launch.atomic_write_text", disk_full)
    assert run_main(*TINY, f"hydra.run.dir={tmp_path}/run") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"prefopt: error: cannot write {tmp_path}/run/config.yaml: No space left on device; the disk is full" in err


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "prefopt.cli", "train", *TINY, "trainer.max_steps=100000", f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "metrics.jsonl").is_file() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert (run_dir / "metrics.jsonl").is_file(), "training never started"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("prefopt: interrupted")
    assert f"trainer.resume={run_dir}" in last or "no checkpoint" in last, last
