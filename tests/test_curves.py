"""`prefopt plot`'s training curves and `prefopt report` on a folder of ad-hoc runs, on run dirs written by hand: the
figure's input is the run dir's files (metrics.jsonl, config.yaml, overrides.yaml, Hydra's record), so the panels'
lines are checked against the numbers written, the legends against the settings that differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prefopt.cli import main
from prefopt.observe.curves import CURVE_PANELS, curves_figure, ema, read_curves, runs_in
from prefopt.observe.run_settings import run_legend_labels

TRAIN_STEPS, EVAL_STEPS = (1, 2, 3, 4), (0, 4)
TRAIN_NAMES = ("loss", "rewards/margins", "rewards/accuracies", "grad_norm") + tuple(
    f"{kind}/{side}" for kind in ("logps", "rewards") for side in ("chosen", "rejected")
)
EVAL_NAMES = tuple(name for name in TRAIN_NAMES if name != "grad_norm")


def metric_value(name: str, step: int, drift: float) -> float:
    """A distinct number per metric and step; the rejected side moves 10x more than the chosen side."""
    scale = 10.0 if name.endswith("rejected") else 1.0
    return -50.0 * name.startswith("logps") + scale * drift * step + len(name) * 0.01


def write_run(run_dir: Path, overrides: list[str], loss: str, beta: float, drift: float, lr_name: str) -> Path:
    """A run dir as `prefopt train` leaves it, for the files the plot and the report read."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    (run_dir / "config.yaml").write_text(
        OmegaConf.to_yaml({"loss": {"name": loss, "beta": beta}, "model": {"name": "tiny_llama"}, "run_dir": "x"})
    )
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        OmegaConf.to_yaml({"hydra": {"runtime": {"choices": {"loss": loss, "model": "tiny_llama"}}}})
    )
    rows = [{"step": 0, "data/train/pairs": 16}]
    for step in range(5):
        if step in TRAIN_STEPS:
            row = {f"train/{name}": metric_value(name, step, drift) for name in TRAIN_NAMES}
            rows.append({"step": step, **row, f"train/{lr_name}": 1e-3 * step})
        if step in EVAL_STEPS:
            rows.append({"step": step, **{f"eval/{name}": metric_value(name, step, -drift) for name in EVAL_NAMES}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "summary.json").write_text(json.dumps({"eval/rewards/accuracies": 0.5, "steps": 4}))
    return run_dir


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    """Ad-hoc runs at different depths: gate_dpo at beta 0.05 (TRL's lr name), dpo at its default beta (the old)."""
    shared = ["model=tiny_llama", "trainer.max_steps=4"]
    return [
        write_run(
            tmp_path / "runs" / "day1" / "gate",
            [*shared, "loss=gate_dpo", "loss.beta=0.05"],
            "gate_dpo",
            0.05,
            1.0,
            "learning_rate",
        ),
        write_run(tmp_path / "runs" / "dpo", shared, "dpo", 0.1, 0.5, "lr"),
    ]


def panel_axes(figure) -> dict:
    titles = {panel.title for panel in CURVE_PANELS}
    return {axis.get_title(): axis for axis in figure.axes if axis.get_title() in titles}


def test_curves_draw_every_metric_train_and_eval_with_legends_of_what_differs(two_runs):
    labels, shared = run_legend_labels(two_runs)
    assert labels == ["loss=gate_dpo, loss.beta=0.05", "loss=dpo, loss.beta=0.1"]  # dpo's beta: its config's default
    assert shared == "model=tiny_llama, trainer.max_steps=4"
    runs = [read_curves(run_dir, label) for run_dir, label in zip(two_runs, labels)]
    figure = curves_figure(runs)
    axes = panel_axes(figure)
    assert list(axes) == [panel.title for panel in CURVE_PANELS]
    for panel in CURVE_PANELS:
        lines = axes[panel.title].get_lines()
        name = panel.names[0]
        if name in ("learning_rate", "grad_norm"):  # train only; the old run's train/lr is read as the learning rate
            expected = [(TRAIN_STEPS, [1e-3 * step if name == "learning_rate" else metric_value(name, step, drift)
                                       for step in TRAIN_STEPS]) for drift in (1.0, 0.5)]  # fmt: skip
        else:  # per run: its train line, then its eval points
            expected = [
                (steps, [metric_value(name, step, sign * drift) for step in steps])
                for drift in (1.0, 0.5)
                for steps, sign in ((TRAIN_STEPS, 1), (EVAL_STEPS, -1))
            ]
        assert [(tuple(line.get_xdata()), list(line.get_ydata())) for line in lines] == expected, panel.title
    [legend] = [axis.get_legend() for axis in figure.axes if axis.get_legend() is not None]
    assert [text.get_text() for text in legend.get_texts()][2:] == [
        "loss=gate_dpo, loss.beta=0.05",
        "loss=dpo, loss.beta=0.1",
    ]


def test_one_metric_is_one_axis_and_chosen_rejected_share_a_scale(two_runs):
    """Every run's points lie inside its panel's one axis; the chosen and rejected panels of one quantity span the
    same amount, so the chosen side's small move reads small next to the rejected side's 10x larger one."""
    figure = curves_figure([read_curves(run_dir, run_dir.name) for run_dir in two_runs])
    axes = panel_axes(figure)
    for axis in axes.values():
        low, high = axis.get_ylim()
        assert all(low <= value <= high for line in axis.get_lines() for value in line.get_ydata())
    for kind in ("log-prob", "reward"):
        chosen, rejected = (axes[f"{side} {kind}"].get_ylim() for side in ("chosen", "rejected"))
        assert chosen[1] - chosen[0] == pytest.approx(rejected[1] - rejected[0])
        chosen_values = [value for line in axes[f"chosen {kind}"].get_lines() for value in line.get_ydata()]
        assert max(chosen_values) - min(chosen_values) < 0.2 * (chosen[1] - chosen[0])  # small: not filling the panel


def test_a_single_run_has_no_run_legend_and_plot_cli_writes_it(two_runs, capsys):
    labels, shared = run_legend_labels(two_runs[:1])
    assert labels == [""] and shared == "model=tiny_llama, trainer.max_steps=4, loss=gate_dpo, loss.beta=0.05"
    figure = curves_figure([read_curves(two_runs[0])])
    [legend] = [axis.get_legend() for axis in figure.axes if axis.get_legend() is not None]
    assert [text.get_text() for text in legend.get_texts()] == ["train (per step)", "eval (held-out pairs)"]
    assert main(["plot", str(two_runs[0]), "--smooth", "0.5"]) == 0
    assert capsys.readouterr().out.strip() == str(two_runs[0] / "plot.png")
    assert (two_runs[0] / "plot.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        main(["plot", str(two_runs[0]), "--smooth", "1"])


def test_ema_is_tensorboards_debiased_average():
    values, weight = [1.0, 3.0, float("nan"), 2.0], 0.5
    first = 0.5 * 1.0 / 0.5  # (1 - w) * x1 / (1 - w^1)
    second = (0.5 * (0.5 * 1.0) + 0.5 * 3.0) / (1 - 0.25)
    third = (0.5 * (0.5 * (0.5 * 1.0) + 0.5 * 3.0) + 0.5 * 2.0) / (1 - 0.125)
    smoothed = ema(values, weight)
    assert smoothed[0] == pytest.approx(first) and smoothed[1] == pytest.approx(second)
    assert smoothed[2] != smoothed[2] and smoothed[3] == pytest.approx(third)  # NaN passes through, skipped
    assert ema(values[:2], 0.0) == values[:2]


def test_report_on_a_folder_of_adhoc_runs_names_only_what_differs(two_runs, tmp_path, capsys):
    folder = tmp_path / "runs"
    checkpoint = two_runs[1] / "checkpoints" / "step-000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.yaml").write_text("loss: {}\n")  # a checkpoint's config is not a run of its own
    (folder / "notes").mkdir()
    assert main(["report", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "Shared by every row: model=tiny_llama, trainer.max_steps=4\n" in out
    assert "| day1/gate | loss=gate_dpo, loss.beta=0.05 |" in out and "| dpo | loss=dpo, loss.beta=0.1 |" in out
    assert out.count("trainer.max_steps=4") == 1 and "2 runs, 0 failed" in out
    markdown = (folder / "report.md").read_text()
    assert markdown.count("| ok |") == 2 and "Shared by every row: model=tiny_llama, trainer.max_steps=4" in markdown
    assert (folder / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert runs_in(folder) == two_runs and runs_in(two_runs[1]) == [two_runs[1]]  # `prefopt plot FOLDER`: its runs
