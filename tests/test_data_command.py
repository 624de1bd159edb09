"""`prefopt data`: the layout, counts and first pairs a run would train on, decoded from the token ids the model
reads, built exactly as `prefopt train` builds them; no run dir, no model weights; bad data is one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prefopt.cli import main
from prefopt.model.loading import build_byte_tokenizer

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"} for i in range(10)]
BASE = ["model=tiny_llama", "dataset=local", "dataset.cache_dir=null"]


def prefopt_data(*args: str) -> int:
    argv = sys.argv
    try:
        return main(["data", *args])
    finally:
        sys.argv = argv


def test_it_prints_layout_counts_split_and_pairs_as_the_chat_template_renders_them(tmp_path, monkeypatch, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    monkeypatch.chdir(tmp_path)
    assert prefopt_data(*BASE, f"dataset.path={path}", "dataset.eval_fraction=0.2", "--pairs", "2") == 0
    out = capsys.readouterr().out
    assert "layout   strings" in out and "chat template used" in out
    assert (
        f"train    8 pairs from file {path} (train part)" in out
        and f"eval     2 pairs from file {path} (held-out part)" in out
    )
    assert "eval = dataset.eval_fraction=0.2 of the rows, held out by trainer.seed=0" in out
    tokenizer = build_byte_tokenizer()  # tiny_llama's tokenizer: ChatML
    shown = [line for line in out.splitlines() if line.startswith("  prompt")]
    assert len(shown) == 2
    # train keeps source order: the first training pair is the first row the seed did not hold out
    first_row = next(
        ROWS[int(line.split("row index ")[1].rstrip(")"))]
        for line in out.splitlines()
        if line.startswith("train pair 1")
    )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": first_row["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    assert shown[0].endswith(repr(rendered)), (shown[0], rendered)
    assert (
        repr(first_row["chosen"] + "<|im_end|>") in out
    )  # the response ends the template's way, special token visible
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # no run dir, no outputs/


def test_bad_data_is_one_line_exit_2(tmp_path):
    """A subprocess: the exit code and all of stderr, as a user sees them."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "q", "chosen": \n')
    result = subprocess.run(
        [sys.executable, "-m", "prefopt.cli", "data", *BASE, f"dataset.path={path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("prefopt: error: ") and str(path) in message and "line 2" in message, message


@pytest.mark.parametrize("override, named", [("dataset=nonexistent", "dataset"), ("dataset=local", "dataset.path")])
def test_a_bad_override_is_one_line_exit_2(override, named, capsys):
    assert prefopt_data("model=tiny_llama", override) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("prefopt: error: ") and named in message, message


def test_gpu_hardware_is_not_needed_to_show_the_data(tmp_path, monkeypatch, capsys):
    """`prefopt data hardware=zero3 ...` on a CPU login node: no model loads, so the run's GPUs need not be here."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    assert prefopt_data(*BASE, f"dataset.path={path}", "hardware=zero3", "--pairs", "1") == 0
    assert "train    " in capsys.readouterr().out


def test_an_unwritable_cache_and_ctrl_c_are_one_line(tmp_path, monkeypatch, capsys):
    import errno
    import os

    import prefopt.run.data_preview as datacmd

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "cache" / "pairs.pt"))

    monkeypatch.setattr(datacmd, "build_preference_data", full)
    assert prefopt_data(*BASE, f"dataset.path={path}") == 2
    err = capsys.readouterr().err
    assert (
        f"prefopt: error: cannot write {tmp_path}/cache/pairs.pt: No space left on device" in err
        and "Traceback" not in err
    )

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datacmd, "build_preference_data", interrupted)
    assert prefopt_data(*BASE, f"dataset.path={path}") == 130
    assert "interrupted" in capsys.readouterr().err
