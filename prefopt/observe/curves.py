"""`prefopt plot RUN_DIR [RUN_DIR ...]` (its options: prefopt/cli.py): the run itself, from each run dir's
metrics.jsonl, the curves a TRL user first looks for in W&B: loss, reward margin and accuracy, chosen and rejected
log-probs and rewards, learning rate and gradient norm; train steps as lines, held-out evals (eval/*) as points on
the same panels. Runs that probed (dynamics.jsonl) get today's probe panels below (prefopt/observe/plots.py).

Several runs share one figure, one color per run, each panel one metric (so one axis for every run); the legend
names only the settings that differ between the runs (prefopt/observe/run_settings.py) and the title the shared
ones. Chosen and rejected panels of one quantity are drawn at one scale (same units per tick height), so a 0.01-nat
wiggle on one side does not look like the other side's 1-nat trend.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from prefopt.core.runfiles import DYNAMICS_FILE, METRICS_FILE, is_run_dir
from prefopt.observe.metric_names import with_current_names
from prefopt.observe.plots import (
    LOGP_LABEL,
    STEP_LABEL,
    RunDirError,
    RunTrace,
    band_colors,
    draw_probe_panels,
    overlay_height,
    readable_axes,
    same_scale,
    save_png,
)
from prefopt.observe.run_settings import run_legend_labels
from prefopt.observe.sweep_status import run_dirs_under
from prefopt.observe.tracking import read_jsonl

TRAIN, EVAL = "train/", "eval/"
REWARD_LABEL = "reward (beta x log-ratio, nats)"


@dataclass(frozen=True)
class CurvePanel:
    title: str
    names: tuple[str, ...]  # the metric's names under train/ and eval/, the first one a run has is drawn
    ylabel: str
    scale_group: str = ""  # panels of one group are drawn at one scale (same_scale)
    smoothed: bool = True  # --smooth applies (not to the learning rate: a schedule, not a noisy measurement)


# two rows of five; the last cell holds the legend
CURVE_PANELS = (
    CurvePanel("loss", ("loss",), "loss (nats)"),
    CurvePanel("reward margin (chosen - rejected)", ("rewards/margins",), REWARD_LABEL),
    CurvePanel("reward accuracy", ("rewards/accuracies",), "pairs with chosen > rejected reward (0-1)"),
    CurvePanel("learning rate", ("learning_rate", "lr"), "learning rate (per step)", smoothed=False),  # TRL's, old name
    CurvePanel("gradient norm", ("grad_norm",), "L2 norm before clipping"),
    CurvePanel("chosen log-prob", ("logps/chosen",), LOGP_LABEL, "logps"),
    CurvePanel("rejected log-prob", ("logps/rejected",), LOGP_LABEL, "logps"),
    CurvePanel("chosen reward", ("rewards/chosen",), REWARD_LABEL, "rewards"),
    CurvePanel("rejected reward", ("rewards/rejected",), REWARD_LABEL, "rewards"),
)
CURVE_GRID = (2, 5)
PANEL_SIZE = (4.2, 3.2)  # inches per panel, as the probe panels
DEFAULT_TITLE = "Training curves"


@dataclass
class RunCurves:
    label: str  # the settings that set this run apart ("" for a single run)
    metrics: dict[str, dict[int, float]]  # metric key -> step -> value (a resumed run's repeated step: the last)
    dynamics: list[dict]  # dynamics.jsonl rows in step order ([] when the run did not probe)


def read_curves(run_dir: Path, label: str = "") -> RunCurves:
    """A run dir's metrics.jsonl as one series per metric, under today's names; RunDirError when it has neither
    metrics nor probes to draw."""
    run_dir = Path(run_dir)
    try:
        rows, dynamics = read_jsonl(run_dir / METRICS_FILE), read_jsonl(run_dir / DYNAMICS_FILE)
    except ValueError as error:  # a damaged line before the last: the message names the file and line
        raise RunDirError(str(error)) from None
    metrics: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in with_current_names(row).items():
            if key.startswith((TRAIN, EVAL)) and isinstance(value, (int, float)) and "step" in row:
                metrics.setdefault(key, {})[int(row["step"])] = float(value)
    if not any(key.startswith((TRAIN, EVAL)) for key in metrics) and not dynamics:
        found = "no train or eval metrics recorded" if rows else "not found"
        raise RunDirError(
            f"{run_dir / METRICS_FILE}: {found}; give a run dir of `prefopt train` or `prefopt eval` that has logged "
            "a step, or a folder holding such run dirs"
        )
    dynamics = sorted({row["step"]: row for row in dynamics if "step" in row}.values(), key=lambda row: row["step"])
    return RunCurves(label, metrics, dynamics)


def series(run: RunCurves, prefix: str, panel: CurvePanel) -> tuple[list[int], list[float]]:
    """The run's (steps, values) of a panel's metric under `prefix` (the first of its names the run has)."""
    for name in panel.names:
        points = run.metrics.get(prefix + name)
        if points:
            steps = sorted(points)
            return steps, [points[step] for step in steps]
    return [], []


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's smoothing weight (0 = none, 0.9 = heavy), debiased so the
    first points are not pulled towards 0; a non-finite value passes through without poisoning the rest."""
    smoothed, average, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        count += 1
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**count) if weight > 0 else value)
    return smoothed


def draw_curve_panel(axis, runs: Sequence[RunCurves], colors: list, panel: CurvePanel, smoothing: float) -> None:
    """One metric: per run (its color) the train line (smoothed over a faint raw line when asked) and the eval
    points; a metric no run logged says so."""
    drawn = False
    for run, color in zip(runs, colors):
        steps, values = series(run, TRAIN, panel)
        if steps:
            if smoothing > 0 and panel.smoothed:
                axis.plot(steps, values, color=color, linewidth=1.0, alpha=0.25)
                values = ema(values, smoothing)
            axis.plot(steps, values, color=color, linewidth=1.5)
            drawn = True
        steps, values = series(run, EVAL, panel)
        if steps:
            axis.plot(steps, values, ":", color=color, marker="o", markersize=5, linewidth=1.0)
            drawn = True
    if not drawn:
        axis.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=axis.transAxes)
    axis.set_title(panel.title)
    readable_axes(axis, STEP_LABEL, panel.ylabel, integer_x=True)
    axis.grid(alpha=0.3)


def curve_legend(axis, runs: Sequence[RunCurves], colors: list, smoothing: float) -> None:
    """The spare cell: how train and eval are drawn, then one entry per run when there are several."""
    train = "train (per step" + (f", EMA {smoothing:g} over the faint raw line)" if smoothing > 0 else ")")
    handles = [
        Line2D([], [], color="black", linewidth=1.5),
        Line2D([], [], linestyle=":", color="black", marker="o", markersize=5, linewidth=1.0),
    ]
    labels = [train, "eval (held-out pairs)"]
    if len(runs) > 1:
        handles += [Line2D([], [], color=color, linewidth=3) for color in colors]
        labels += [textwrap.fill(run.label, 45) for run in runs]
    axis.axis("off")
    axis.legend(handles, labels, loc="center", fontsize="small", frameon=False)


def draw_curves(container, runs: Sequence[RunCurves], colors: list, smoothing: float) -> None:
    """The training-curve panels in a figure or subfigure."""
    rows, columns = CURVE_GRID
    axes = container.subplots(rows, columns).flatten()
    for axis, panel in zip(axes, CURVE_PANELS):
        draw_curve_panel(axis, runs, colors, panel, smoothing)
    for group in dict.fromkeys(panel.scale_group for panel in CURVE_PANELS if panel.scale_group):
        same_scale([axis for axis, panel in zip(axes, CURVE_PANELS) if panel.scale_group == group])
    curve_legend(axes[len(CURVE_PANELS)], runs, colors, smoothing)
    for axis in axes[len(CURVE_PANELS) + 1 :]:
        axis.axis("off")


def curves_figure(runs: Sequence[RunCurves], title: str = DEFAULT_TITLE, smoothing: float = 0.0) -> Figure:
    """The training curves of `runs`; below them, when any run probed, the probe panels with the same colors (only
    those when no run logged a train or eval metric: nine empty panels say nothing)."""
    rows, columns = CURVE_GRID
    width, height = PANEL_SIZE
    probe_traces = [RunTrace(run.label, run.dynamics) for run in runs]
    heights = [
        height * rows + 0.6 if any(run.metrics for run in runs) else 0.0,
        overlay_height(probe_traces) if any(run.dynamics for run in runs) else 0.0,
    ]
    figure = Figure(figsize=(width * columns, sum(heights)), layout="constrained")
    FigureCanvasAgg(figure)
    colors = band_colors(len(runs))
    curves_part, probes_part = figure.subfigures(2, 1, height_ratios=heights) if all(heights) else (figure, figure)
    if heights[1]:
        if all(heights):
            probes_part.suptitle("Probe log-probs (dynamics.jsonl) vs step")
        draw_probe_panels(probes_part, probe_traces, colors)
    if heights[0]:
        draw_curves(curves_part, runs, colors, smoothing)
    figure.suptitle(title)
    return figure


def figure_title(subject: str, shared: str, several: bool) -> str:
    """`Training curves: <subject>`, then the settings every run shares (wrapped), or the one run's."""
    head = f"{DEFAULT_TITLE}: {subject}"
    return head + ("\n" + textwrap.fill(("shared: " if several else "") + shared, 160) if shared else "")


def runs_in(path: Path) -> list[Path]:
    """A run dir itself; a folder that is none (a sweep dir, a folder of runs): the run dirs in it at any depth."""
    if is_run_dir(path) or not path.is_dir():
        return [path]
    return run_dirs_under(path) or [path]  # none inside: read_curves names the path


def plot_training(
    run_dirs: Sequence[str | os.PathLike],
    output_path: str | os.PathLike,
    smoothing: float = 0.0,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
) -> Path:
    """`prefopt plot`: the training curves (and probe panels) of `run_dirs` (a folder among them: the runs in it) as
    one PNG at `output_path`, each run labelled by the settings that differ unless `labels` are given; RunDirError
    names a dir with nothing to draw."""
    run_dirs = [run for run_dir in run_dirs for run in runs_in(Path(run_dir))]
    runs = [read_curves(run_dir) for run_dir in run_dirs]  # refuses a dir with nothing to draw before reading configs
    found_labels, shared = run_legend_labels(run_dirs)
    for run, label in zip(runs, labels or found_labels):
        run.label = label
    subject = run_dirs[0].resolve().name if len(run_dirs) == 1 else f"{len(run_dirs)} runs"
    figure = curves_figure(runs, title or figure_title(subject, shared, len(run_dirs) > 1), smoothing)
    return save_png(figure, output_path)
