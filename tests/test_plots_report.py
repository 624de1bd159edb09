"""`prefopt plot` and `prefopt report` on run dirs and a sweep dir made by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prefopt.cli import main
from prefopt.observe.plots import PANELS, load_run, plot_runs, run_label
from prefopt.observe.report import build_report, mark_differences, plot_label
from prefopt.observe.sweep_status import job_dirs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def dynamics_row(step: int, drift: float) -> dict:
    row = {"step": step}
    for _, key, _ in PANELS:
        row[key] = -10.0 - drift * step if key.endswith("/logp") else 0.5 + 0.01 * drift * step
    return row


def make_run(
    run_dir: Path, overrides: list[str] | None, drift: float = 1.0, summary: dict | None = None, dynamics: bool = True
) -> Path:
    run_dir.mkdir(parents=True)
    if overrides is not None:
        (run_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if dynamics:
        (run_dir / "dynamics.jsonl").write_text(
            "".join(json.dumps(dynamics_row(step, drift)) + "\n" for step in (0, 5, 10))
        )
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def cli(*argv: str) -> int:
    return main(list(argv))


def test_run_label_uses_the_overrides_or_the_dir_name(tmp_path):
    labelled = make_run(tmp_path / "a", ["loss=gate_dpo", "loss.beta=0.05"])
    unlabelled = make_run(tmp_path / "plain-run", None)
    assert run_label(labelled) == "loss=gate_dpo loss.beta=0.05"
    assert run_label(unlabelled) == "plain-run"
    assert [row["step"] for row in load_run(labelled).rows] == [0, 5, 10]


def test_plot_runs_overlays_runs_in_one_png(tmp_path):
    runs = [make_run(tmp_path / "dpo", ["loss=dpo"]), make_run(tmp_path / "gate", ["loss=gate_dpo"], drift=0.2)]
    path = plot_runs(runs, tmp_path / "out" / "overlay.png")
    assert path == tmp_path / "out" / "overlay.png"
    assert_png(path)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_plot_cli_default_output_and_explicit_output(tmp_path, capsys):
    first, second = make_run(tmp_path / "r1", ["loss=dpo"]), make_run(tmp_path / "r2", ["loss=ipo"])
    assert cli("plot", str(first), str(second)) == 0
    assert_png(first / "plot.png")
    assert cli("plot", str(first), "-o", str(tmp_path / "chosen.png")) == 0
    assert_png(tmp_path / "chosen.png")


def test_plot_cli_names_a_dir_with_nothing_to_draw(tmp_path, capsys):
    good, empty = make_run(tmp_path / "good", ["loss=dpo"]), make_run(tmp_path / "empty", ["loss=dpo"], dynamics=False)
    assert cli("plot", str(good), str(empty)) == 2
    error = capsys.readouterr().err
    assert str(empty / "metrics.jsonl") in error and "prefopt: error:" in error
    assert not (good / "plot.png").exists()


@pytest.fixture
def sweep(tmp_path) -> Path:
    sweep_dir = tmp_path / "multirun"
    summary = lambda chosen, accuracy, name="eval/rewards/accuracies": {  # noqa: E731
        "delta/chosen": chosen,
        "delta/rejected": -8.0,
        "delta/others": -1.5,
        "delta/greedy": 0.75,
        name: accuracy,
        "steps": 10,
    }
    # job 0 ran before prefopt took TRL's metric names: the report reads its old name as the new one
    make_run(sweep_dir / "0", ["loss=dpo", "loss.beta=0.1"], summary=summary(-2.0, 0.75, name="eval/rewards/accuracy"))
    make_run(sweep_dir / "1", ["loss=gate_dpo", "loss.beta=0.1"], drift=0.3, summary=summary(-0.25, 0.5))
    crashed = make_run(sweep_dir / "2", ["loss=lpo", "loss.beta=0.1"], summary=summary(0.1, 0.25))
    (crashed / "error.txt").write_text("Traceback ...\nRuntimeError: boom\n")
    make_run(sweep_dir / "3", ["loss=ipo", "loss.beta=0.1"], dynamics=False)  # died before writing anything
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")  # Hydra's own files are not jobs
    return sweep_dir


def test_report_has_one_row_per_job_and_marks_failures(sweep):
    rows, plot = build_report(sweep)
    assert [row["job"] for row in rows] == [0, 1, 2, 3]
    assert [row["overrides"] for row in rows] == [
        "loss=dpo loss.beta=0.1",
        "loss=gate_dpo loss.beta=0.1",
        "loss=lpo loss.beta=0.1",
        "loss=ipo loss.beta=0.1",
    ]
    assert [row["status"] for row in rows] == ["ok", "ok", "failed", "failed"]
    assert rows[1]["dChosen"] == -0.25 and rows[0]["eval_accuracy"] == 0.75 and rows[0]["steps"] == 10
    assert rows[3]["dChosen"] is None
    assert plot == sweep / "report.png"
    assert_png(plot)

    with open(sweep / "report.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["job"] for row in table] == ["0", "1", "2", "3"]
    assert table[0]["overrides"] == "loss=dpo loss.beta=0.1" and table[0]["dChosen"] == "-2.0"
    assert table[3]["status"] == "failed" and table[3]["dGreedy"] == ""
    markdown = (sweep / "report.md").read_text()
    assert "| 1 | loss=gate_dpo | -0.250 | -8.000 | -1.500 | 0.750 | 0.500 | 10 | ok |" in markdown  # what differs
    assert markdown.count("loss.beta=0.1") == 1 and "Shared by every row: loss.beta=0.1\n" in markdown


def test_report_cli_prints_the_table(sweep, capsys):
    assert cli("report", str(sweep)) == 0
    out = capsys.readouterr().out
    assert "| job | differs | dChosen | dRejected | dOthers | dGreedy | eval_accuracy | steps | status |" in out
    assert out.count("| failed |") == 2
    for name in ("report.md", "report.csv", "report.png"):
        assert (sweep / name).is_file()


def test_report_cli_errors_on_a_dir_without_jobs(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    assert cli("report", str(tmp_path)) == 2
    assert f"{tmp_path}: no sweep jobs (0, 1, 2, ...) and no run dirs inside" in capsys.readouterr().err
    assert cli("report", str(tmp_path / "missing")) == 2


def test_sweep_plot_labels_show_what_differs_between_jobs(sweep):
    rows = [{"job": int(job.name), "dir": job} for job in job_dirs(sweep)[:3]]
    assert mark_differences(rows).shared == ["loss.beta=0.1"]
    assert [plot_label(row) for row in rows] == ["job 0: loss=dpo", "job 1: loss=gate_dpo", "job 2: loss=lpo"]
    assert mark_differences(rows[:1]).shared == ["loss=dpo", "loss.beta=0.1"] and plot_label(rows[0]) == "job 0"


def test_job_dirs_are_in_numeric_order(tmp_path):
    for number in (10, 2, 0, 1):
        (tmp_path / str(number)).mkdir()
    assert [path.name for path in job_dirs(tmp_path)] == ["0", "1", "2", "10"]


def test_report_without_dynamics_writes_the_table_and_no_plot(tmp_path):
    make_run(tmp_path / "0", ["loss=dpo"], summary={"steps": 3}, dynamics=False)
    rows, plot = build_report(tmp_path)
    assert plot is None and rows[0]["status"] == "ok" and rows[0]["steps"] == 3
    assert (tmp_path / "report.csv").is_file() and not (tmp_path / "report.png").exists()


def test_band_plot_is_readable_with_and_without_an_interval(tmp_path):
    from prefopt.observe.plots import BAND_PANELS, BAND_Y_LABEL, Band, GroupBands, band_figure, plot_bands

    nan = float("nan")
    seeds3 = GroupBands(
        "loss=dpo (n=3)",
        {key: Band([0, 10], [-112.5, -113.0], [-113.0, -114.0], [-112.0, -112.0]) for _, key in BAND_PANELS},
    )
    seed1 = GroupBands(
        "loss=ipo (n=1)", {key: Band([0, 10], [-112.5, -112.6], [nan, nan], [nan, nan]) for _, key in BAND_PANELS}
    )
    figure = band_figure([seeds3, seed1])
    panels = [axis for axis in figure.axes if axis.get_title()]
    assert [axis.get_title() for axis in panels] == [title for title, _ in BAND_PANELS]
    assert all(
        axis.get_ylabel() == BAND_Y_LABEL == "summed log-prob (nats)" and axis.get_xlabel() == "training step"
        for axis in panels
    )
    assert not any(
        axis.yaxis.get_major_formatter().get_useOffset() for axis in panels
    )  # -112.5 reads as -112.5, not an offset
    [legend] = figure.legends  # one legend for the figure, not one per panel
    assert [text.get_text() for text in legend.get_texts()] == ["loss=dpo (n=3)", "loss=ipo (n=1)"]
    assert_png(plot_bands([seeds3, seed1], tmp_path / "bands.png"))


def test_band_plot_draws_one_row_per_facet_with_one_color_per_series(tmp_path):
    """A study's regimes: a row of the four panels per regime, a loss keeps its color across rows, and the
    legend names each loss once (16 groups in one set of panels repeated colors and clipped the legend)."""
    from matplotlib.colors import to_rgba

    from prefopt.observe.plots import BAND_PANELS, Band, GroupBands, band_figure

    def group(loss, regime, offset):
        bands = {
            key: Band([0, 10], [offset, offset - 1.0], [offset - 0.5, offset - 1.5], [offset + 0.5, offset - 0.5])
            for _, key in BAND_PANELS
        }
        return GroupBands(
            f"loss={loss} style={regime} (n=3)", bands, facet=f"style={regime}", series=f"loss={loss} (n=3)"
        )

    losses = [f"loss{index}" for index in range(12)]  # more than tab10 holds: the colors must still differ
    figure = band_figure(
        [group(loss, regime, -10.0 - index) for regime in ("near", "off") for index, loss in enumerate(losses)]
    )
    panels = [axis for axis in figure.axes if axis.get_title()]
    assert [axis.get_title() for axis in panels] == [
        f"{title}\nstyle={regime}" for regime in ("near", "off") for title, _ in BAND_PANELS
    ]
    assert all(len(axis.get_lines()) == len(losses) for axis in panels)  # each row holds its own facet's groups only
    [legend] = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [f"loss={loss} (n=3)" for loss in losses]
    near_colors = [to_rgba(line.get_color()) for line in panels[0].get_lines()]
    off_colors = [to_rgba(line.get_color()) for line in panels[len(BAND_PANELS)].get_lines()]
    assert near_colors == off_colors and len(set(near_colors)) == len(losses)
