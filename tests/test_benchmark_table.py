"""scripts/benchmark.py --vs-trl's report on synthetic results (no TRL, no model, no timing): every row has the
header's cells, the end-to-end rate counts step 1 and the one-off reference pass, a pass that was not timed leaves
it undefined, a failed case still gets its row, and the loss check compares prefopt default with padded."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
STEPS = 3
PLAN = {"step_tokens": [1000, 1200, 1100], "pair_tokens": [275] * 12}


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("prefopt_benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finished(case: str, step_s: list[float], loss: list[float], ref=None, forward=True) -> dict:
    return {
        "case": case,
        "label": case,
        "returncode": 0,
        "wall_s": 99.0,
        "log": f"{case}.log",
        "peak_rss_gb": 6.5,
        "reference_forward": forward,
        "step_s": step_s,
        "loss": loss,
        "ref_pass_s": ref,
        "ref_pass_pairs": None if ref is None else 12,
        "cpu_at_step": {1: 10.0, 2: 30.0, 3: 50.0},
    }


def synthetic_results(padded_last_loss: float) -> dict:
    return {
        "trl": finished("trl", [30, 25, 25], [0.6931, 0.69, 0.689]),
        "trl-best": finished("trl-best", [20, 15, 15], [0.6931, 0.69, 0.689], ref=40.0, forward=False),
        "prefopt-padded": finished("prefopt-padded", [12, 10, 10], [0.6931, 0.69, padded_last_loss]),
        "prefopt-default": finished("prefopt-default", [9, 7, 7], [0.6931, 0.69, 0.689], ref=6.0, forward=False),
        "prefopt-packed-precompute": finished("prefopt-packed-precompute", [9, 7, 7], [0.6931] * 3, ref=math.nan),
        "trl-precompute": {
            "case": "trl-precompute",
            "label": "trl-precompute",
            "returncode": 1,
            "wall_s": 5.0,
            "log": "trl-precompute.log",
            "peak_rss_gb": 1.2,
            "reference_forward": False,
        },
    }


def test_vs_trl_table_columns_end_to_end_and_loss_check(benchmark):
    assert benchmark.VS_TRL_DEFAULT == ("trl", "trl-best", "prefopt-padded", "prefopt-default")
    assert set(benchmark.VS_TRL_DEFAULT) < set(benchmark.VS_TRL_CASES)
    results = synthetic_results(padded_last_loss=0.68905)
    lines = benchmark.vs_trl_table(results, PLAN, STEPS, [300.0, 310.0], 134_515_008, load=((1.0,), (2.0,)))
    header = lines.index(next(line for line in lines if line.startswith("| case | real tokens/s")))
    table = lines[header : lines.index("", header)]
    assert len(table) == 2 + len(results)
    assert {line.count("|") for line in table} == {14}, table
    assert "vs TRL best" in table[0] and "end-to-end tokens/s" in table[0]

    total = sum(PLAN["step_tokens"])
    assert results["trl"]["e2e_tokens_per_s"] == pytest.approx(total / 80)  # no one-off pass: steps 1..N only
    assert results["trl-best"]["e2e_tokens_per_s"] == pytest.approx(total / (50 + 40))
    assert results["prefopt-default"]["e2e_tokens_per_s"] == pytest.approx(total / (23 + 6))
    assert "e2e_tokens_per_s" not in results["prefopt-packed-precompute"]  # its pass was not timed
    default_row = next(line for line in table if line.startswith("| prefopt-default |"))
    best_ratio = (total / 29) / (total / 90)
    assert f"| {best_ratio:.2f}x |" in default_row
    assert "n/a (reference pass not timed)" in next(line for line in table if "packed-precompute" in line)
    assert "failed (1, 0 steps)" in next(line for line in table if line.startswith("| trl-precompute |"))
    assert any("max abs difference 5.00e-05" in line and "ok" in line for line in lines)

    check = benchmark.vs_trl_loss_check(synthetic_results(padded_last_loss=0.6895), STEPS)
    assert check["max_abs_diff"] == pytest.approx(5e-4) and check["ok"] is False
    del results["prefopt-padded"]["loss"]
    assert benchmark.vs_trl_loss_check(results, STEPS)["ok"] is None
