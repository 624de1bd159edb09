"""Statistics over seeds (prefopt/observe/stats.py) and `prefopt report --group-by/--baseline` on sweep dirs made by
hand.

Expected numbers are worked out by hand in the comments; t quantiles are the printed tables' values."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prefopt.cli import split_keys
from prefopt.core.errors import ConfigError
from prefopt.observe.group_report import band_facet_key, group_bands
from prefopt.observe.seed_groups import Group, find_baselines, group_jobs, read_job
from prefopt.observe.stats import estimate, mean, paired_difference, sample_std, t_cdf, t_quantile
from prefopt.observe.sweep_status import job_dirs
from tests.test_plots_report import assert_png, cli, make_run

# ---- statistics -------------------------------------------------------------------------------------


def test_mean_and_sample_std_use_n_minus_1():
    # mean 5; squared deviations 9 + 1 + 1 + 9 = 20; / (n-1 = 3) -> variance 20/3
    assert mean([2.0, 4.0, 6.0, 8.0]) == 5.0
    assert sample_std([2.0, 4.0, 6.0, 8.0]) == pytest.approx(math.sqrt(20 / 3), rel=1e-12)


def test_t_interval_of_a_small_sample():
    # [1, 2, 3, 4]: mean 2.5, std sqrt(5/3) = 1.290994, t(0.975, 3) = 3.182446,
    # half-width 3.182446 * 1.290994 / 2 = 2.054260
    value = estimate([1.0, 2.0, 3.0, 4.0])
    assert (value.n, value.mean) == (4, 2.5)
    assert value.std == pytest.approx(1.290994, abs=1e-6)
    assert value.half_width == pytest.approx(2.054260, abs=1e-6)
    assert (value.ci_low, value.ci_high) == pytest.approx((2.5 - 2.054260, 2.5 + 2.054260), abs=1e-6)


@pytest.mark.parametrize(
    "df, expected",
    [
        (1, 12.706205),
        (2, 4.302653),
        (3, 3.182446),
        (4, 2.776445),
        (9, 2.262157),
        (29, 2.045230),
        (100, 1.983972),
        (1000, 1.962339),
    ],
)
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-6)  # symmetric
    assert t_cdf(expected, df) == pytest.approx(0.975, abs=1e-7)


def test_t_quantile_far_tails_and_center():
    assert t_quantile(0.995, 3) == pytest.approx(5.840909, abs=1e-6)
    assert t_quantile(0.9995, 1) == pytest.approx(636.619249, abs=1e-5)
    assert t_quantile(0.5, 7) == 0.0
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_one_value_has_no_interval_and_none_has_no_mean():
    one = estimate([3.5])
    assert (one.n, one.mean, one.std, one.ci_low, one.ci_high, one.half_width) == (1, 3.5, None, None, None, None)
    assert estimate([]) == estimate([]) and estimate([]).mean is None and estimate([]).n == 0


def test_paired_difference_matches_seeds_and_counts_the_dropped():
    # seeds 0, 1, 2 on both sides: differences 1, 2, 6 -> mean 3, std sqrt((4 + 1 + 9) / 2) = sqrt(7);
    # seed 3 only in the group and seed 7 only in the baseline are dropped
    group = {0: 2.0, 1: 4.0, 2: 9.0, 3: 100.0}
    baseline = {2: 3.0, 1: 2.0, 0: 1.0, 7: -50.0}
    difference = paired_difference(group, baseline)
    assert difference.paired_seeds == (0, 1, 2) and difference.dropped_seeds == (3, 7)
    assert difference.estimate.n == 3 and difference.estimate.mean == pytest.approx(3.0)
    assert difference.estimate.std == pytest.approx(math.sqrt(7))
    assert difference.estimate.half_width == pytest.approx(4.302653 * math.sqrt(7) / math.sqrt(3), abs=1e-5)


# ---- sweep dirs made by hand ------------------------------------------------------------------------


def make_job(
    sweep_dir: Path,
    number: int,
    loss: str,
    seed: int,
    chosen: float,
    extra: list[str] = (),
    beta: float = 0.1,
    failed: bool = False,
    gate: list[float] = (),
    write_overrides_for: tuple[str, ...] = ("loss", "trainer.seed"),
) -> Path:
    """A job dir as `prefopt train -m` leaves it: overrides.yaml, config.yaml (the defaults), summary.json,
    dynamics.jsonl (chosen log-prob -10 - (1 + seed) * step), metrics.jsonl with the gate when given;
    a failed job has error.txt and no summary."""
    overrides = [f"loss={loss}"] * ("loss" in write_overrides_for) + [f"trainer.seed={seed}"] * (
        "trainer.seed" in write_overrides_for
    )
    summary = (
        None
        if failed
        else {
            "delta/chosen": chosen,
            "delta/rejected": -2 * chosen,
            "eval/rewards/accuracies": 0.5 + 0.1 * seed,
            "eval/delta/logps/chosen": chosen / 2,
            "steps": 10,
            "train_seconds": 3.0,
            "data/pairs": 16,
        }
    )
    job_dir = make_run(sweep_dir / str(number), [*overrides, *extra], drift=1.0 + seed, summary=summary)
    config = {
        "trainer": {"seed": seed, "lr": 3e-6},
        "loss": {"name": "dpo", "beta": beta, "gate": {"kind": "none"}},
        "run_dir": str(job_dir),
        "logger": {"wandb": {"name": " ".join(overrides)}},
    }
    (job_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    if gate:
        (job_dir / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": step + 1, "train/gate/mean": value}) + "\n" for step, value in enumerate(gate))
        )
    if failed:
        (job_dir / "error.txt").write_text("Traceback ...\nRuntimeError: boom\n")
    return job_dir


@pytest.fixture
def seeded_sweep(tmp_path) -> Path:
    """2 losses x 3 seeds and one failed job (gate_dpo, seed 3).
    delta/chosen: dpo 1, 2, 3 (mean 2, std 1); gate_dpo 2, 4, 9 (mean 5, std sqrt(13)); paired 1, 2, 6 (mean 3,
    std sqrt(7))."""
    sweep_dir = tmp_path / "multirun"
    for number, (loss, seed, chosen) in enumerate(
        [
            ("dpo", 0, 1.0),
            ("dpo", 1, 2.0),
            ("dpo", 2, 3.0),
            ("gate_dpo", 0, 2.0),
            ("gate_dpo", 1, 4.0),
            ("gate_dpo", 2, 9.0),
        ]
    ):
        gate = [0.1 * (seed + 1), 0.1 * (seed + 3)] if loss == "gate_dpo" else []  # run averages 0.2, 0.3, 0.4
        make_job(sweep_dir, number, loss, seed, chosen, gate=gate)
    make_job(sweep_dir, 6, "gate_dpo", 3, 0.0, failed=True)
    return sweep_dir


def groups_of(sweep_dir: Path, group_by: list[str]) -> list[Group]:
    """The grouping alone (no files written, no plot drawn: fast)."""
    return group_jobs([read_job(job_dir) for job_dir in job_dirs(sweep_dir)], group_by)


def read_csv(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    """(group, compared_to, metric) -> row."""
    with open(path) as handle:
        return {(row["group"], row["compared_to"], row["metric"]): row for row in csv.DictReader(handle)}


def test_report_groups_seeds_with_intervals_and_paired_differences(seeded_sweep, capsys):
    assert cli("report", str(seeded_sweep), "--group-by", "loss", "--baseline", "loss=dpo") == 0
    out = capsys.readouterr().out
    assert "| 6 | loss=gate_dpo, trainer.seed=3 |  |  |  |  |  |  | failed |" in out  # the per-job table still marks it

    # dpo: 2 ± 4.302653 / sqrt(3) = 2.484138; gate_dpo: 5 ± 4.302653 * sqrt(13) / sqrt(3) = 8.956686
    # delta/rejected = -2 * delta/chosen; eval accuracy 0.5, 0.6, 0.7 -> 0.6 ± 4.302653 * 0.1 / sqrt(3) = 0.248414
    # gate mean over seeds 0.2, 0.3, 0.4 -> 0.3 ± 0.248414; dpo ran without a gate (empty cell)
    # others and greedy come from dynamics.jsonl (the summary lacks them): -10 * (1 + seed) -> -20 ± 24.841377
    markdown = (seeded_sweep / "report_groups.md").read_text()
    assert (
        "| group | n | delta/chosen | delta/rejected | delta/others | delta/greedy | eval/rewards/accuracies "
        "| train/gate/mean | failed |" in markdown
    )
    assert (
        "| loss=dpo | 3 | 2.000 ± 2.484 | -4.000 ± 4.968 | -20.000 ± 24.841 | -20.000 ± 24.841 | 0.600 ± 0.248 |  | 0 |"
        in markdown
    )
    assert (
        "| loss=gate_dpo | 3 | 5.000 ± 8.957 | -10.000 ± 17.913 | -20.000 ± 24.841 | -20.000 ± 24.841 | 0.600 ± 0.248 "
        "| 0.300 ± 0.248 | 1 |"
    ) in markdown
    # paired: chosen differences 1, 2, 6 -> 3 ± 4.302653 * sqrt(7) / sqrt(3) = 6.572411 (rejected: twice that);
    # accuracy, others and greedy are the same per seed: differences 0 ± 0; no gate in the baseline: empty
    assert "## Paired differences vs loss=dpo" in markdown
    assert (
        "| loss=gate_dpo | loss=dpo | 3 | 0 | 3.000 ± 6.572 | -6.000 ± 13.145 | 0.000 ± 0.000 | 0.000 ± 0.000 "
        "| 0.000 ± 0.000 |  |" in markdown
    )
    assert markdown in out  # printed too

    rows = read_csv(seeded_sweep / "report_groups.csv")
    dpo_chosen = rows[("loss=dpo", "", "delta/chosen")]
    assert dpo_chosen["loss"] == "dpo" and dpo_chosen["n"] == "3"
    assert float(dpo_chosen["mean"]) == pytest.approx(2.0) and float(dpo_chosen["std"]) == pytest.approx(1.0)
    assert (float(dpo_chosen["ci_low"]), float(dpo_chosen["ci_high"])) == pytest.approx(
        (2 - 2.484138, 2 + 2.484138), abs=1e-6
    )
    gate_chosen = rows[("loss=gate_dpo", "", "delta/chosen")]
    assert float(gate_chosen["std"]) == pytest.approx(math.sqrt(13))
    paired = rows[("loss=gate_dpo", "loss=dpo", "delta/chosen")]
    assert float(paired["mean"]) == pytest.approx(3.0) and paired["n"] == "3" and paired["dropped_seeds"] == "0"
    assert float(paired["ci_high"]) == pytest.approx(3 + 6.572411, abs=1e-5)
    # every metric: summary eval/* (eval/delta/* too), and the probe deltas from dynamics.jsonl
    # (peakiness 0.5 + 0.01 * (1 + seed) * step: its change over 10 steps is 0.1, 0.2, 0.3 -> mean 0.2)
    assert float(rows[("loss=dpo", "", "eval/delta/logps/chosen")]["mean"]) == pytest.approx(1.0)
    assert float(rows[("loss=dpo", "", "delta/mass/peakiness")]["mean"]) == pytest.approx(0.2)
    assert not any(metric in ("steps", "train_seconds", "data/pairs") for _, _, metric in rows)
    assert ("loss=dpo", "", "train/gate/mean") not in rows and ("loss=gate_dpo", "", "train/gate/mean") in rows

    assert_png(seeded_sweep / "report_bands.png")
    for name in ("report.md", "report.csv", "report.png"):
        assert (seeded_sweep / name).is_file()


def test_bands_are_the_mean_and_t_interval_per_step(seeded_sweep):
    dpo = group_bands(groups_of(seeded_sweep, ["loss"])[0])
    assert dpo.label == "loss=dpo (n=3)"
    chosen = dpo.bands["dynamics/chosen/logp"]
    # step 10: -10 - (1 + seed) * 10 = -20, -30, -40 -> mean -30, std 10, half-width 4.302653 * 10 / sqrt(3)
    assert chosen.steps == [0, 5, 10] and chosen.mean[2] == pytest.approx(-30.0)
    assert chosen.high[2] - chosen.mean[2] == pytest.approx(43.02653 / math.sqrt(3), abs=1e-4)
    assert chosen.low[0] == chosen.high[0] == -10.0  # every seed starts at -10: a zero-width interval


def test_a_single_seed_group_has_n_1_and_no_interval(tmp_path, capsys):
    make_job(tmp_path, 0, "dpo", 0, 1.0)
    make_job(tmp_path, 1, "dpo", 1, 3.0)
    make_job(tmp_path, 2, "ipo", 0, 2.0)
    make_job(tmp_path, 3, "lpo", 0, 0.0, failed=True)  # a group with no finished job at all
    assert cli("report", str(tmp_path), "--group-by", "loss", "--baseline", "loss=dpo") == 0
    markdown = (tmp_path / "report_groups.md").read_text()
    assert "| loss=ipo | 1 | 2.000 (n<2: no interval) |" in markdown
    assert "| loss=lpo | 0 |  |" in markdown and markdown.rstrip().endswith("|")
    # ipo has seed 0 only: one pair (difference 2 - 1 = 1), seed 1 dropped
    assert "| loss=ipo | loss=dpo | 1 | 1 (seed 1) | 1.000 (n<2: no interval) |" in markdown
    rows = read_csv(tmp_path / "report_groups.csv")
    ipo = rows[("loss=ipo", "", "delta/chosen")]
    assert (ipo["n"], ipo["mean"], ipo["std"], ipo["ci_low"], ipo["ci_high"]) == ("1", "2.0", "", "", "")
    assert rows[("loss=ipo", "loss=dpo", "delta/chosen")]["dropped_seeds"] == "1"
    assert_png(tmp_path / "report_bands.png")  # a band of one seed is a line without a band, not a crash


def test_grouping_refuses_jobs_that_differ_in_another_key(tmp_path, capsys):
    make_job(tmp_path, 0, "dpo", 0, 1.0, extra=["loss.beta=0.1"])
    make_job(tmp_path, 1, "dpo", 1, 2.0, extra=["loss.beta=0.05"], beta=0.05)
    with pytest.raises(
        ConfigError, match=r"jobs 0 and 1 \(group loss=dpo\) differ in loss.beta \(loss.beta=0.1 vs loss.beta=0.05\)"
    ):
        groups_of(tmp_path, ["loss"])
    assert cli("report", str(tmp_path), "--group-by", "loss") == 2
    assert "prefopt: error: jobs 0 and 1" in capsys.readouterr().err
    assert (
        not (tmp_path / "report_groups.md").exists() and not (tmp_path / "report.md").exists()
    )  # refused before writing
    groups = groups_of(tmp_path, ["loss", "loss.beta"])  # grouping by the key too is fine: two groups of n=1
    assert [group.label for group in groups] == ["loss=dpo loss.beta=0.1", "loss=dpo loss.beta=0.05"]


def test_a_key_a_job_does_not_override_counts_as_its_default(tmp_path):
    # job 1 leaves loss.beta and loss out: its config.yaml (beta: 0.1) and Hydra's recorded choice (loss: dpo) count
    make_job(tmp_path, 0, "dpo", 0, 1.0, extra=["loss.beta=1e-1"])
    job = make_job(tmp_path, 1, "dpo", 1, 2.0, write_overrides_for=("trainer.seed",))
    (job / ".hydra").mkdir()
    (job / ".hydra" / "hydra.yaml").write_text(
        OmegaConf.to_yaml({"hydra": {"runtime": {"choices": {"loss": "dpo", "loss/gate": "default"}}}})
    )
    [group] = groups_of(tmp_path, ["loss"])
    assert group.label == "loss=dpo" and [job.number for job in group.jobs] == [0, 1]
    # a differing default is still a difference
    (tmp_path / "1" / "config.yaml").write_text(OmegaConf.to_yaml({"trainer": {"seed": 1}, "loss": {"beta": 0.2}}))
    with pytest.raises(ConfigError, match=r"differ in loss.beta \(loss.beta=1e-1 vs loss.beta=0.2\)"):
        groups_of(tmp_path, ["loss"])


def test_a_repeated_seed_is_refused(tmp_path):
    make_job(tmp_path, 0, "dpo", 0, 1.0)
    make_job(tmp_path, 1, "dpo", 0, 1.0)
    with pytest.raises(
        ConfigError, match=r"jobs 0 and 1 \(group loss=dpo\) are the same setting with the same trainer.seed=0"
    ):
        groups_of(tmp_path, ["loss"])


def test_group_by_and_baseline_mistakes_are_one_line_errors(seeded_sweep, capsys):
    assert cli("report", str(seeded_sweep), "--group-by", "los") == 2
    assert "--group-by los: no job sets it" in capsys.readouterr().err
    assert cli("report", str(seeded_sweep), "--group-by", "loss", "--baseline", "loss=ipo") == 2
    assert (
        "--baseline loss=ipo: no group has these values; the groups are: loss=dpo; loss=gate_dpo"
        in capsys.readouterr().err
    )
    assert cli("report", str(seeded_sweep), "--group-by", "loss", "--baseline", "loss.beta=0.1") == 2
    assert "KEY one of the --group-by keys (loss)" in capsys.readouterr().err
    assert cli("report", str(seeded_sweep), "--baseline", "loss=dpo") == 2
    assert "--baseline needs --group-by" in capsys.readouterr().err


def test_group_by_keys_comma_separated_or_repeated(seeded_sweep):
    assert split_keys(["loss,loss.gate.kind", "loss.beta", "loss,loss"]) == ["loss", "loss.gate.kind", "loss.beta"]
    group_by = split_keys(["loss,loss.gate.kind"])
    groups = groups_of(seeded_sweep, group_by)
    named = find_baselines(groups, ["loss=gate_dpo,loss.gate.kind=none"], group_by)
    assert {baseline.label for baseline in named.values()} == {"loss=gate_dpo loss.gate.kind=none"}
    assert set(named) == {group.label for group in groups}  # every key named: one baseline for all groups


def test_baseline_naming_some_keys_compares_within_each_stratum(tmp_path):
    """--group-by loss,regime --baseline loss=dpo: each loss is compared with dpo in its own regime."""
    sweep_dir = tmp_path / "multirun"
    number = 0
    for regime, shift in (("near", 0.0), ("offpolicy", 100.0)):
        for loss, seed, chosen in [("dpo", 0, 1.0), ("dpo", 1, 2.0), ("gate_dpo", 0, 3.0), ("gate_dpo", 1, 5.0)]:
            make_job(sweep_dir, number, loss, seed, chosen + shift, extra=[f"dataset.arith.rejected_style={regime}"])
            number += 1
    group_by = ["loss", "dataset.arith.rejected_style"]
    groups = groups_of(sweep_dir, group_by)
    baselines = find_baselines(groups, ["loss=dpo"], group_by)
    assert {label: baseline.label for label, baseline in baselines.items()} == {
        group.label: f"loss=dpo dataset.arith.rejected_style={group.label.rsplit('=', 1)[1]}" for group in groups
    }
    assert (
        cli("report", str(sweep_dir), "--group-by", "loss,dataset.arith.rejected_style", "--baseline", "loss=dpo") == 0
    )
    markdown = (sweep_dir / "report_groups.md").read_text()
    # paired within a regime: 3-1, 5-2 -> 2.5 ± 12.706205 * sqrt(0.5) / sqrt(2) = 6.353; across regimes it would be ~100
    for regime in ("near", "offpolicy"):
        assert (
            f"| loss=gate_dpo dataset.arith.rejected_style={regime} | loss=dpo dataset.arith.rejected_style={regime} "
            "| 2 | 0 | 2.500 ± 6.353 |"
        ) in markdown
    # the band plot: one row of panels per regime, each group named by its loss within the row
    assert band_facet_key(groups, group_by) == "dataset.arith.rejected_style"
    assert band_facet_key(groups, ["loss"]) is None
    bands = {group.label: group_bands(group, "dataset.arith.rejected_style") for group in groups}
    gate_near = bands["loss=gate_dpo dataset.arith.rejected_style=near"]
    assert (gate_near.facet, gate_near.series) == ("dataset.arith.rejected_style=near", "loss=gate_dpo (n=2)")
