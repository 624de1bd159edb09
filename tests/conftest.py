"""Shared fixtures. Data: tokenizers and small preference files written under tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def own_wandb_service_per_process():
    """A test that runs W&B in this process (run_train with wandb offline) makes wandb export WANDB_SERVICE, the
    address of this process's W&B service, into os.environ; every `prefopt` a later test starts would inherit it and
    log through that one service, which outlives the runs it served: a run killed with -9 stays "in use" there and
    its resume fails, and an exit can wait on it. A user's `prefopt` owns its service; so does each test's."""
    yield
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="session")
def byte_tokenizer():
    """Byte-level tokenizer, no BOS, ChatML template (the tiny models' tokenizer)."""
    from prefopt.model.loading import build_byte_tokenizer

    return build_byte_tokenizer(add_bos=False)


@pytest.fixture(scope="session")
def bos_byte_tokenizer():
    """Byte-level tokenizer that prepends <|bos|> and whose chat template writes it too (the double-BOS trap)."""
    from prefopt.model.loading import build_byte_tokenizer

    return build_byte_tokenizer(add_bos=True)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML, no BOS added), from the installed GGUF package."""

    from prefopt.core.errors import ModelNotFoundError
    from prefopt.model.loading import load_tokenizer
    from tests.helpers import preset

    try:
        return load_tokenizer(preset("model", "smollm2_135m"))
    except ModelNotFoundError as error:
        pytest.skip(f"SmolLM2 is not installed: {error}")


def write_preference_rows(path: Path, rows: list) -> Path:
    """Write rows as .json (a list), .jsonl (one object per line) or .parquet, by the path's suffix."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"unsupported suffix {path.suffix}")
    return path


@pytest.fixture
def preference_file(tmp_path):
    """preference_file(rows, suffix=".jsonl", name="pairs") -> path of a new file under tmp_path."""

    def write(rows: list, suffix: str = ".jsonl", name: str = "pairs") -> Path:
        return write_preference_rows(tmp_path / f"{name}{suffix}", rows)

    return write


def pytest_terminal_summary(terminalreporter):
    """The fault-injection table (tests/test_faults.py): each case and what happened."""
    import sys

    faults = sys.modules.get("tests.test_faults")
    if faults is None or not faults.FAULT_OUTCOMES:
        return
    terminalreporter.section("fault injection: case -> outcome")
    width = max(len(case) for case, _ in faults.FAULT_OUTCOMES)
    for case, outcome in faults.FAULT_OUTCOMES:
        terminalreporter.write_line(f"{case.ljust(width)} | {outcome}")
