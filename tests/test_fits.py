"""`prefopt report --group-by ... --fit KEY` (prefopt/observe/fits.py, its files in prefopt/observe/group_report.py):
least-squares lines against a numeric setting, checked against numpy's polyfit and the printed t table, on a folder
of run dirs made by hand (no model)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy
import pytest
from omegaconf import OmegaConf

from prefopt.observe.fits import fit_strata, least_squares
from prefopt.observe.group_report import fit_csv, fit_markdown
from prefopt.observe.seed_groups import Group, Job, Setting, term_gradient_means
from tests.test_plots_report import assert_png, cli, make_run

T_975_DF13 = 2.160369  # the printed t table: 15 runs (5 values x 3 seeds), 13 degrees of freedom
R2_VALUES = (0.05, 0.1, 0.2, 0.4, 0.8)
NOISE = {0: 0.03, 1: -0.05, 2: 0.04}  # per seed, times a per-value factor: small, known, not on the line


def rejected_delta(r2: float, seed: int) -> float:
    return 3 - 20 * r2 + NOISE[seed] * (1 + 10 * r2) * (-1) ** R2_VALUES.index(r2)


def make_lpo_job(root: Path, number: int, r2: float, gamma: float, seed: int) -> Path:
    """A finished LPO run: delta/rejected = 3 - 20 r2 + noise, delta/chosen = 0.5 + r2 exactly, and per-term gradient
    norms at probe steps 0, 5, 10; step 0 holds 100 (the shared init, which must not count), later steps average to
    chosen 2 + 0.01 seed and rejected 1 + 4 r2."""
    overrides = [f"loss.r2={r2}", f"loss.gamma={gamma}", f"trainer.seed={seed}"]
    summary = {"delta/rejected": rejected_delta(r2, seed), "delta/chosen": 0.5 + r2, "delta/others": -1.0}
    job_dir = make_run(root / str(number), overrides, summary=summary, dynamics=False)
    config = {"trainer": {"seed": seed}, "loss": {"name": "lpo", "r2": r2, "gamma": gamma}, "run_dir": str(job_dir)}
    (job_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    rows = [{"step": 0, "dynamics/grad/chosen_norm": 100.0, "dynamics/grad/rejected_norm": 100.0}]
    for step, wiggle in ((5, -0.1), (10, 0.1)):
        chosen, rejected = 2 + 0.01 * seed + wiggle, 1 + 4 * r2 - wiggle
        rows.append({"step": step, "dynamics/grad/chosen_norm": chosen, "dynamics/grad/rejected_norm": rejected})
    (job_dir / "dynamics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return job_dir


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """Issue 26's design: r2 in 5 values x 3 seeds at gamma=10, and gamma=0 at r2=0.2 x 3 seeds (18 runs)."""
    root = tmp_path_factory.mktemp("study")
    settings = [(r2, 10, seed) for r2 in R2_VALUES for seed in range(3)] + [(0.2, 0, seed) for seed in range(3)]
    for number, (r2, gamma, seed) in enumerate(settings):
        make_lpo_job(root, number, r2, gamma, seed)
    return root


def expected_line(x: list[float], y: list[float]) -> tuple[float, float, float, float]:
    """(slope, intercept, half-width of the slope's 95% interval, R^2) by numpy and the closed form."""
    slope, intercept = numpy.polyfit(x, y, 1)
    residuals = numpy.asarray(y) - (intercept + slope * numpy.asarray(x))
    se = math.sqrt((residuals**2).sum() / (len(x) - 2) / ((numpy.asarray(x) - numpy.mean(x)) ** 2).sum())
    return slope, intercept, T_975_DF13 * se, numpy.corrcoef(x, y)[0, 1] ** 2


def test_least_squares_matches_numpy_and_the_t_table():
    x = [r2 for r2 in R2_VALUES for _ in range(3)]
    y = [rejected_delta(r2, seed) for r2 in R2_VALUES for seed in range(3)]
    fit = least_squares(x, y)
    slope, intercept, half_width, r_squared = expected_line(x, y)
    assert fit.n == 15
    assert fit.slope == pytest.approx(slope, rel=1e-9) and fit.intercept == pytest.approx(intercept, rel=1e-9)
    assert fit.half_width == pytest.approx(half_width, rel=1e-6)
    assert (fit.slope_low, fit.slope_high) == pytest.approx((slope - half_width, slope + half_width), rel=1e-6)
    assert fit.r_squared == pytest.approx(r_squared, rel=1e-9)
    assert -21 < fit.slope < -19 and 0.9 < fit.r_squared < 1  # the noise is small but real


def test_a_perfect_line_one_value_and_two_points():
    perfect = least_squares([0.1, 0.2, 0.4, 0.8], [1 - 2 * x for x in (0.1, 0.2, 0.4, 0.8)])
    assert perfect.slope == pytest.approx(-2) and perfect.intercept == pytest.approx(1)
    assert perfect.r_squared == pytest.approx(1) and perfect.half_width == pytest.approx(0, abs=1e-9)
    assert least_squares([0.2, 0.2, 0.2], [1.0, 2.0, 3.0]) is None  # one value of x: no slope
    two = least_squares([0.0, 1.0], [1.0, 3.0])
    assert two.slope == pytest.approx(2) and two.half_width is None  # n=2: no degree of freedom for the noise
    flat = least_squares([0.0, 1.0, 2.0], [5.0, 5.0, 5.0])
    assert flat.slope == 0 and flat.r_squared is None  # nothing to explain


def test_gradient_norms_are_averaged_over_the_probe_steps_after_step_0():
    rows = [{"step": 0, "dynamics/grad/chosen_norm": 100.0, "dynamics/grad/cos": None}]
    rows += [{"step": 5, "dynamics/grad/chosen_norm": 1.0}, {"step": 10, "dynamics/grad/chosen_norm": 3.0}]
    assert term_gradient_means(rows) == {"dynamics/grad/chosen_norm_mean": 2.0}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_report_fit_per_stratum_with_the_one_value_stratum_said(study, capsys):
    assert (
        cli("report", str(study), "--group-by", "loss.r2,loss.gamma", "--baseline", "loss.gamma=10", "--fit", "loss.r2")
        == 0
    )
    out = capsys.readouterr().out
    markdown = (study / "report_groups.md").read_text()
    assert "## Fit against loss.r2" in markdown and markdown in out
    fitted, unfitted = markdown.split("### loss.gamma=10")[1].split("### loss.gamma=0")
    x = [r2 for r2 in R2_VALUES for _ in range(3)]
    slope, intercept, half_width, r_squared = expected_line(
        x, [rejected_delta(r2, seed) for r2 in x[::3] for seed in range(3)]
    )
    rejected_row = next(line for line in fitted.splitlines() if line.startswith("| delta/rejected | 15 |"))
    assert f"{slope:.4g} ± {half_width:.3g}" in rejected_row and f"| {r_squared:.3f} |" in rejected_row
    assert "| delta/chosen | 15 | 1 ± " in fitted  # 0.5 + r2 exactly: slope 1, a zero-width interval, R^2 1
    assert "| loss.r2=0.05 | loss.r2=0.1 |" in fitted  # the means per value, to see whether it is a line
    assert "one value of loss.r2 (0.2): no fit" in unfitted
    assert "| delta/rejected | " in unfitted  # its means are still shown

    rows = {(row["stratum"], row["metric"]): row for row in read_rows(study / "report_fit.csv")}
    rejected = rows[("loss.gamma=10", "delta/rejected")]
    assert rejected["loss.gamma"] == "10" and rejected["n"] == "15" and rejected["x_values"] == "0.05 0.1 0.2 0.4 0.8"
    assert float(rejected["slope"]) == pytest.approx(slope, rel=1e-9)
    assert float(rejected["intercept"]) == pytest.approx(intercept, rel=1e-9)
    assert float(rejected["slope_ci_high"]) == pytest.approx(slope + half_width, rel=1e-6)
    assert float(rejected["r_squared"]) == pytest.approx(r_squared, rel=1e-9)
    # the norms: step 0's 100 left out, so rejected = 1 + 4 r2 exactly, chosen = 2 + 0.01 seed does not move with r2
    norm = rows[("loss.gamma=10", "dynamics/grad/rejected_norm_mean")]
    assert float(norm["slope"]) == pytest.approx(4) and float(norm["r_squared"]) == pytest.approx(1)
    chosen = rows[("loss.gamma=10", "dynamics/grad/chosen_norm_mean")]
    assert float(chosen["slope"]) == pytest.approx(0, abs=1e-9) and float(chosen["intercept"]) == pytest.approx(2.01)
    no_fit = rows[("loss.gamma=0", "delta/rejected")]
    assert no_fit["slope"] == "" and no_fit["note"] == "one value of loss.r2 (0.2): no fit" and no_fit["n"] == "3"

    groups = {
        (row["group"], row["metric"]): row for row in read_rows(study / "report_groups.csv") if not row["compared_to"]
    }
    assert float(groups[("loss.r2=0.4 loss.gamma=10", "dynamics/grad/rejected_norm_mean")]["mean"]) == pytest.approx(
        2.6
    )
    assert_png(study / "report_fit.png")
    assert "report_fit.csv, report_fit.png" in out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--group-by", "loss.r2,loss.gamma", "--fit", "loss.beta"], "--fit loss.beta: not one of the --group-by keys"),
        (["--group-by", "loss.r2,loss.name", "--fit", "loss.name"], "has loss.name=lpo, not a number"),
        (["--fit", "loss.r2"], "--fit loss.r2 needs --group-by"),
    ],
)
def test_fit_mistakes_are_one_line_errors_before_anything_is_written(tmp_path, capsys, arguments, message):
    for number, (r2, seed) in enumerate([(0.1, 0), (0.2, 0)]):
        make_lpo_job(tmp_path, number, r2, 10, seed)
    assert cli("report", str(tmp_path), *arguments) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not list(tmp_path.glob("report*"))


def test_report_help_names_fit(capsys):
    with pytest.raises(SystemExit):
        cli("report", "--help")
    assert "--fit KEY" in capsys.readouterr().out


def test_a_metric_only_one_value_has_is_said_within_a_fitted_stratum():
    """delta/greedy only at r2=0.1: its row says so while delta/rejected gets its line (built without files)."""

    def group(r2: float, metrics: list[dict]) -> Group:
        jobs = [Job(Path(str(seed)), {}, None, {}, False, values, []) for seed, values in enumerate(metrics)]
        return Group((("loss.r2", Setting(json.dumps(r2), str(r2))),), jobs)

    groups = [
        group(0.1, [{"delta/rejected": 1.0, "delta/greedy": 5.0}, {"delta/rejected": 2.0}]),
        group(0.3, [{"delta/rejected": 0.0}]),
    ]
    [stratum] = fit_strata(groups, ["loss.r2"], "loss.r2")
    assert stratum.label == "all runs" and stratum.x_values == [0.1, 0.3]
    fits = {item.metric: item for item in stratum.fits}
    assert fits["delta/rejected"].fit.slope == pytest.approx(-7.5)  # x 0.1, 0.1, 0.3; y 1, 2, 0: Sxy -0.2 / Sxx 0.0267
    assert fits["delta/greedy"].fit is None
    assert "| delta/greedy | 1 | one value of loss.r2 (0.1): no fit |" in fit_markdown([stratum], "loss.r2")
    assert "delta/greedy,1,0.1,,,,,,one value of loss.r2 (0.1): no fit" in fit_csv([stratum], ["loss.r2"], "loss.r2")
