"""scripts/bench_step.py's machinery on a tiny model: every layout trains on the same numbers as padded rows, the
SFT row attends within its sequences only, and the time split accounts for the profiled step. (Its timings are
not checked: benchmarks are measured by hand on an idle machine, README.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_step_layouts_agree_and_the_sft_row_is_packed_correctly(tmp_path):
    command = [
        sys.executable,
        str(REPO / "scripts" / "bench_step.py"),
        "--tiny",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True)
    layouts = json.loads((tmp_path / "bench_step.json").read_text())["layouts"]
    assert set(layouts) == {"padded", "dense-1024", "dense-auto", "pieces", "sft"}
    padded = layouts["padded"]
    assert layouts["pieces"]["shapes"] == ["1x1201", "1x1204"]  # one row per step, no padding
    for name in ("dense-1024", "dense-auto", "pieces"):
        assert layouts[name]["losses"] == pytest.approx(padded["losses"], abs=1e-5), name
        for mine, theirs in zip(layouts[name]["policy_logps"], padded["policy_logps"]):
            assert mine == pytest.approx(theirs, rel=1e-5), name
    check = layouts["sft"]["check"]
    assert check["abs_diff"] < 1e-5 and abs(check["attending_across"] - check["packed"]) > 1e-3
    for name, row in layouts.items():
        seconds = row["split"]["seconds"]
        assert seconds["attention"] > 0 and seconds["matmul"] > 0, name
        assert sum(seconds.values()) == pytest.approx(row["split"]["wall_s"], rel=1e-6), name
    assert (tmp_path / "bench_step.md").read_text().count("| pieces |") == 2  # the step table and the split table
