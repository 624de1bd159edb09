"""The softmax toy: squeezing on a valley target, spreading on the peak, the gate's attenuation, the CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.cli import main
from prefopt.run.toy import CASES, gate_value, run_toy_case, toy_problem

SETTINGS = dict(lr=2.0, steps=1, valley_rank=15, gate_alpha=50.0, gate_tau=0.05)


@pytest.fixture(scope="module")
def problem():
    return toy_problem(num_classes=20, input_dim=8, seed=0, logit_scale=1.5, peak_boost=1.5)


def run(case, problem, **overrides):
    return run_toy_case(case, *problem, **(SETTINGS | overrides))


def test_problem_has_a_clear_peak_and_valleys(problem):
    probs = torch.softmax(problem[0] @ problem[1], -1)
    assert probs.max() > 0.5 and probs.sort().values[4] < 0.01


def test_negative_gradient_on_a_valley_squeezes_mass_onto_the_argmax(problem):
    result = run("negative_valley", problem)
    change = result.probs_after - result.probs_before
    assert result.target != result.argmax
    assert change[result.target] < 0
    assert change[result.argmax] > 0  # the peak gains
    others = change[result.others()]
    assert (others < 0).float().mean() >= 0.9  # and (nearly) everyone else loses
    assert result.numbers()["others_mean_change"] < 0


def test_negative_gradient_on_the_peak_spreads_mass_to_the_other_classes(problem):
    result = run("negative_peak", problem)
    change = result.probs_after - result.probs_before
    assert result.target == result.argmax and change[result.argmax] < 0  # the argmax does not gain
    assert bool((change[result.others()] > 0).all())


def test_positive_gradient_raises_the_target_and_lowers_the_peak(problem):
    result = run("positive", problem)
    change = result.probs_after - result.probs_before
    assert change[result.target] > 0 and change[result.argmax] < 0


def test_gate_attenuates_the_valley_update_by_g(problem):
    ungated, gated = run("negative_valley", problem), run("negative_valley_gated", problem)
    [g] = gated.gates
    assert g == pytest.approx(float(gate_value(gated.probs_before[gated.target], 50.0, 0.05)))
    assert g < 0.1 and ungated.gates == [1.0]
    torch.testing.assert_close(gated.weight_change, g * ungated.weight_change, rtol=1e-10, atol=1e-12)
    gain = lambda result: result.probs_after[result.argmax] - result.probs_before[result.argmax]  # noqa: E731
    assert 0 < gain(gated) < gain(ungated)


def test_several_steps_recompute_the_gate(problem):
    result = run("negative_valley_gated", problem, steps=3)
    assert (
        len(result.gates) == 3 and result.gates[0] > result.gates[1] > result.gates[2]
    )  # p falls, the gate closes further


def test_cli_writes_plots_and_numbers(tmp_path, capsys):
    argv = sys.argv
    try:
        assert main(["toy", f"hydra.run.dir={tmp_path}", "steps=1"]) == 0
    finally:
        sys.argv = argv
    png = tmp_path / "toy_probabilities.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).size > 0
    numbers = json.loads((tmp_path / "toy_results.json").read_text())
    assert [row["case"] for row in numbers] == list(CASES)
    out = capsys.readouterr().out
    assert "negative_valley_gated" in out and "p(argmax)" in out
    config = OmegaConf.load(tmp_path / ".hydra" / "config.yaml")
    assert config.num_classes == 20


def test_cli_rejects_an_unknown_case(tmp_path, capsys):
    argv = sys.argv
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["toy", f"hydra.run.dir={tmp_path}", "cases=[bogus]"])
    finally:
        sys.argv = argv
    assert exit_info.value.code == 2
    assert "cases=['bogus'] is not valid" in capsys.readouterr().err
