"""ruff (configured in pyproject.toml: line length 120, pycodestyle, pyflakes, import order) holds on the package,
its scripts and its tests, and the code is ruff-formatted: CI runs this file like any other."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINTED = ["prefopt", "scripts", "tests", "hydra_plugins"]


def ruff() -> str:
    found = Path(sys.executable).parent / "ruff"
    if found.is_file():
        return str(found)
    on_path = shutil.which("ruff")
    if on_path is None:
        pytest.fail("ruff is not installed: `pip install '.[test]'` installs it")
    return on_path


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_clean(command):
    result = subprocess.run([ruff(), *command, *LINTED], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
