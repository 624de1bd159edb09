"""The probe log-prob trajectories of one or more runs, overlaid, one panel per response type (plus the mass metrics),
from each run dir's dynamics.jsonl; below them a row for the per-term gradients (dynamics.term_grads) when a run
logged them: a run's own dynamics.png, the lower half of `prefopt plot` (prefopt/observe/curves.py, the training
curves above them) and of `prefopt report`'s report.png.
`plot_bands` draws groups of runs instead (`prefopt report --group-by`): mean line and 95% band per group.
`plot_fits` draws metrics against a numeric setting (`prefopt report --fit KEY`): runs, means, fitted line.

Figures are built with matplotlib's object API (Figure + Agg canvas), never pyplot: no global state, no
display needed, safe inside a training process.
"""

from __future__ import annotations

import io
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from prefopt.core.fileutil import atomic_write_bytes
from prefopt.core.runfiles import DYNAMICS_FILE, OVERRIDES_FILE
from prefopt.observe.tracking import read_jsonl

# (panel title, metric key, y-axis label): the squeezing story reads left to right, top to bottom
LOGP_LABEL = "summed log-prob (nats)"
STEP_LABEL = "training step"
PANELS = (
    ("chosen", "dynamics/chosen/logp", LOGP_LABEL),
    ("rejected", "dynamics/rejected/logp", LOGP_LABEL),
    ("greedy (argmax path)", "dynamics/greedy/logp", LOGP_LABEL),
    ("others (mean of the four below)", "dynamics/others/logp", LOGP_LABEL),
    ("other_train", "dynamics/other_train/logp", LOGP_LABEL),
    ("other_test", "dynamics/other_test/logp", LOGP_LABEL),
    ("permuted", "dynamics/permuted/logp", LOGP_LABEL),
    ("random", "dynamics/random/logp", LOGP_LABEL),
    ("peakiness (chosen positions)", "dynamics/mass/peakiness", "mean max-token probability (0-1)"),
    ("entropy (chosen positions)", "dynamics/mass/entropy", "mean entropy per token (nats)"),
    ("target probability (chosen)", "dynamics/mass/target_prob", "mean target-token probability (0-1)"),
)
GRID = (3, 4)  # 11 panels + one that holds the legend
# the per-term gradients (dynamics.term_grads, prefopt/train/term_grads.py), a row of their own under the probes when
# a run logged them: (panel title, ((metric key, line style), ...), y-axis label); dashed = through the gate
NORM_LABEL = "L2 norm over trainable weights"
GRAD_PANELS = (
    ("chosen term", (("dynamics/grad/chosen_norm", "-"),), NORM_LABEL),
    (
        "rejected term: ungated (solid), gated (dashed)",
        (("dynamics/grad/rejected_norm", "-"), ("dynamics/grad/rejected_gated_norm", "--")),
        NORM_LABEL,
    ),
    ("whole loss, as trained", (("dynamics/grad/total_norm", "-"),), NORM_LABEL),
    (
        "cosine(chosen, rejected): ungated (solid), gated (dashed)",
        (("dynamics/grad/cos", "-"), ("dynamics/grad/cos_gated", "--")),
        "cosine (-1 to 1)",
    ),
    ("gate ratio: gated / ungated rejected", (("dynamics/grad/gate_ratio", "-"),), "ratio of norms"),
)
GRAD_TITLE = "Gradients of the loss's terms on a fixed batch of training pairs"
DEFAULT_TITLE = "Learning dynamics: probe log-probs vs step"


class RunDirError(ValueError):
    """A run or sweep dir that lacks what a command needs; the message names the path."""


@dataclass
class RunTrace:
    label: str  # the run's overrides, or its dir name
    rows: list[dict]  # dynamics.jsonl lines, in step order


def run_overrides(run_dir: Path) -> list[str]:
    """The run's Hydra overrides (overrides.yaml, written by `prefopt train`); [] when absent."""
    path = Path(run_dir) / OVERRIDES_FILE
    return [str(item) for item in OmegaConf.load(path)] if path.is_file() else []


def run_label(run_dir: Path) -> str:
    """The run's Hydra overrides joined by spaces; the dir name when there are none."""
    return " ".join(run_overrides(run_dir)) or Path(run_dir).resolve().name


def load_run(run_dir: Path) -> RunTrace:
    path = Path(run_dir) / DYNAMICS_FILE
    if not path.is_file():
        raise RunDirError(f"{path}: not found; plot a run dir of a run trained with dynamics.enabled=true")
    rows = sorted(read_jsonl(path), key=lambda row: row["step"])
    if not rows:
        raise RunDirError(f"{path}: empty, no probe evaluation was recorded yet")
    return RunTrace(run_label(run_dir), rows)


def readable_axes(axis, xlabel: str, ylabel: str, integer_x: bool = False) -> None:
    """Axis labels (with units), and tick labels that read as the values themselves: no offset text
    (log-probs around -112.3 must not read as '-1.123e2' plus ticks 0.0002, 0.0004) and no scientific
    notation on a linear axis; integer_x: whole numbers on x (steps). Call after the scale is set
    (setting it resets the ticks)."""
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    for name, scale in (("x", axis.get_xscale()), ("y", axis.get_yscale())):
        if scale == "linear":  # a log axis has its own formatter, without offsets
            axis.ticklabel_format(axis=name, style="plain", useOffset=False)
    if integer_x:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def has_term_gradients(traces: Sequence[RunTrace]) -> bool:
    keys = {key for _, lines, _ in GRAD_PANELS for key, _ in lines}
    return any(keys & row.keys() for trace in traces for row in trace.rows)


def draw_panel(axis, traces: Sequence[RunTrace], colors: list, title: str, lines, ylabel: str) -> None:
    """One metric panel: per run (one color each, the same on every panel) a line per (key, style); a panel no run
    has values for says so (the gate's panels of ungated runs) instead of drawing empty axes."""
    drawn = False
    for trace, color in zip(traces, colors):
        for index, (key, style) in enumerate(lines):
            points = [(row["step"], row[key]) for row in trace.rows if row.get(key) is not None]
            if points:
                steps, values = zip(*points)
                label = trace.label if index == 0 else None
                axis.plot(steps, values, style, color=color, marker="o", markersize=3, linewidth=1.5, label=label)
                drawn = True
    if not drawn:
        axis.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=axis.transAxes)
    axis.set_title(title)
    readable_axes(axis, STEP_LABEL, ylabel, integer_x=True)
    axis.grid(alpha=0.3)


def same_scale(axes) -> None:
    """Draw `axes` (panels of one quantity) at one scale: each keeps its own center but all get the widest span, so
    equal steps on the y axis are equal amounts on every panel and a 0.01-nat wiggle does not fill a panel the way a
    1-nat trend fills its neighbor. Panels without data keep theirs."""
    drawn = [axis for axis in axes if axis.get_lines()]
    limits = [axis.get_ylim() for axis in drawn]
    span = max((high - low for low, high in limits), default=0.0)
    if span <= 0:
        return
    for axis, (low, high) in zip(drawn, limits):
        middle = (low + high) / 2
        axis.set_ylim(middle - span / 2, middle + span / 2)


def overlay_height(traces: Sequence[RunTrace]) -> float:
    """Inches the probe panels take (draw_probe_panels), with the gradients' row when a run logged it."""
    return 3.2 * GRID[0] + (3.6 if has_term_gradients(traces) else 0)


def draw_probe_panels(container, traces: Sequence[RunTrace], colors: list) -> None:
    """One panel per probe metric in a figure or subfigure, one line per run, one legend (in the spare panel) for
    all, the summed log-prob panels at one scale; below them, when a run logged the per-term gradients, a row of
    gradient panels. Runs whose labels are all empty (a single run) get no legend."""
    rows, columns = GRID
    if has_term_gradients(traces):
        probe_part, gradient_part = container.subfigures(2, 1, height_ratios=[3.2 * rows, 3.6])
        gradient_part.suptitle(GRAD_TITLE)
        for axis, (panel_title, lines, ylabel) in zip(gradient_part.subplots(1, len(GRAD_PANELS)), GRAD_PANELS):
            draw_panel(axis, traces, colors, textwrap.fill(panel_title, 32), lines, ylabel)
    else:
        probe_part = container
    axes = probe_part.subplots(rows, columns).flatten()
    for axis, (panel_title, key, ylabel) in zip(axes, PANELS):
        draw_panel(axis, traces, colors, panel_title, ((key, "-"),), ylabel)
    same_scale([axis for axis, (_, key, _) in zip(axes, PANELS) if key.endswith("/logp")])
    legend_axis = axes[len(PANELS)]
    legend_axis.axis("off")
    if any(trace.label for trace in traces):
        legend_axis.legend(  # one entry per run, whichever panels it has lines in
            [Line2D([], [], color=color, marker="o", markersize=3, linewidth=1.5) for color in colors],
            [textwrap.fill(trace.label, 45) for trace in traces],
            loc="center",
            fontsize="small",
            title="runs",
            frameon=False,
        )
    for axis in axes[len(PANELS) + 1 :]:
        axis.axis("off")


def overlay_figure(traces: Sequence[RunTrace], title: str = DEFAULT_TITLE) -> Figure:
    """The probe panels of `traces` (draw_probe_panels) as a figure of their own (the run's dynamics.png)."""
    figure = Figure(figsize=(4.2 * GRID[1], overlay_height(traces)), layout="constrained")
    FigureCanvasAgg(figure)
    draw_probe_panels(figure, traces, band_colors(len(traces)))
    figure.suptitle(title)
    return figure


def save_png(figure: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Written atomically (fileutil), so a reader never sees half a PNG."""
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=dpi)
    atomic_write_bytes(path, png.getvalue())
    return Path(path)


def plot_runs(
    run_dirs: Sequence[str | os.PathLike],
    output_path: str | os.PathLike,
    title: str = DEFAULT_TITLE,
    labels: Optional[Sequence[str]] = None,
) -> Path:
    """Overlay the dynamics of `run_dirs` in one PNG at `output_path`, each line labelled by its run's
    overrides unless `labels` are given; RunDirError names a dir without dynamics."""
    traces = [load_run(Path(run_dir)) for run_dir in run_dirs]
    for trace, label in zip(traces, labels or []):
        trace.label = label
    return save_png(overlay_figure(traces, title), output_path)


# the four response types whose trajectories tell the squeezing story; one panel each in the band plot
BAND_PANELS = (
    ("chosen", "dynamics/chosen/logp"),
    ("rejected", "dynamics/rejected/logp"),
    ("greedy (argmax path)", "dynamics/greedy/logp"),
    ("others (mean of the four unrelated responses)", "dynamics/others/logp"),
)
BAND_Y_LABEL = LOGP_LABEL
DEFAULT_BAND_TITLE = "Probe log-probs per group: mean over seeds, shaded 95% t interval"


@dataclass
class Band:
    """One group's mean trajectory of one probe metric and its 95% interval, step by step; low and high
    are NaN at steps with fewer than 2 seeds (matplotlib leaves a gap there: no interval, not a fake one)."""

    steps: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]


@dataclass
class GroupBands:
    label: str  # the group's settings and its number of seeds
    bands: dict[str, Band]  # metric key (BAND_PANELS) -> band
    facet: str = ""  # the row of panels it is drawn in (e.g. "dataset.arith.rejected_style=near"); "" = one row for all
    series: str = ""  # its legend entry within the row (the label without the facet); "" = the label


def band_colors(count: int) -> list:
    """`count` distinguishable colors: tab10, then tab20 (paired shades) up to 20, then a continuous map."""
    from matplotlib import colormaps

    if count <= 10:
        return [f"C{index}" for index in range(count)]
    if count <= 20:
        return [colormaps["tab20"](index) for index in range(count)]
    return [colormaps["turbo"](index / (count - 1)) for index in range(count)]


def band_figure(groups: Sequence[GroupBands], title: str = DEFAULT_BAND_TITLE) -> Figure:
    """One line + band per group, in the same color on every panel, one legend for all. Groups with facets
    are drawn one row of the four panels per facet (a study's regimes side by side, one color per loss);
    otherwise 2 x 2 panels with every group in each."""
    facets = list(dict.fromkeys(group.facet for group in groups))
    faceted = len(facets) > 1
    series = list(dict.fromkeys((group.series or group.label) if faceted else group.label for group in groups))
    colors = dict(zip(series, band_colors(len(series))))
    if faceted:
        figure = Figure(figsize=(18, 3.8 * len(facets) + 1.5), layout="constrained")
        FigureCanvasAgg(figure)
        grid = figure.subplots(len(facets), len(BAND_PANELS), squeeze=False)
        cells = [
            (grid[row][column], panel, facet)
            for row, facet in enumerate(facets)
            for column, panel in enumerate(BAND_PANELS)
        ]
    else:
        figure = Figure(figsize=(11, 8), layout="constrained")
        FigureCanvasAgg(figure)
        cells = [(axis, panel, None) for axis, panel in zip(figure.subplots(2, 2).flatten(), BAND_PANELS)]
    for axis, (panel_title, key), facet in cells:
        for group in groups:
            if facet is not None and group.facet != facet:
                continue
            band = group.bands.get(key)
            if band is None or not band.steps:
                continue
            name = (group.series or group.label) if faceted else group.label
            axis.plot(band.steps, band.mean, color=colors[name], marker="o", markersize=3, linewidth=1.5, label=name)
            axis.fill_between(band.steps, band.low, band.high, color=colors[name], alpha=0.15, linewidth=0)
        axis.set_title(f"{panel_title}\n{facet}" if faceted else panel_title, fontsize="medium" if faceted else None)
        readable_axes(axis, STEP_LABEL, BAND_Y_LABEL, integer_x=True)
        axis.grid(alpha=0.3)
    same_scale([axis for axis, _, _ in cells])  # every panel is a summed log-prob: one scale for all
    handles, labels = {}, []
    for axis, _, _ in cells:  # a group may lack a panel's metric: collect every labelled line once
        for handle, label in zip(*axis.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    if labels:
        width = 45 if not faceted else 40
        columns = min(len(labels), 4 if faceted else 2)
        figure.legend(
            [handles[label] for label in labels],
            [textwrap.fill(label, width) for label in labels],
            loc="outside lower center",
            ncols=columns,
            fontsize="small",
            title="groups",
            frameon=False,
        )
    figure.suptitle(title)
    return figure


def plot_bands(groups: Sequence[GroupBands], output_path: str | os.PathLike, title: str = DEFAULT_BAND_TITLE) -> Path:
    """The band plot of `groups` as one PNG at `output_path`."""
    return save_png(band_figure(groups, title), output_path)


DEFAULT_FIT_TITLE = "Metrics against a setting: runs (dots), means over seeds (diamonds), least-squares line"


@dataclass
class FitPanel:
    """One metric of one stratum against the fitted key: a point per run, the mean at each x, and the line
    (slope None: no line, e.g. one value of the key; `note` says why or gives the slope)."""

    title: str
    xlabel: str
    ylabel: str
    points: list[tuple[float, float]]
    means: list[tuple[float, float]]
    slope: Optional[float] = None
    intercept: Optional[float] = None
    note: str = ""


def fit_figure(rows: Sequence[Sequence[FitPanel]], title: str = DEFAULT_FIT_TITLE) -> Figure:
    """A row of panels per stratum, a column per metric; each panel its own y scale (the metrics differ in units)."""
    columns = max(len(row) for row in rows)
    figure = Figure(figsize=(4.4 * columns, 3.6 * len(rows) + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(rows), columns, squeeze=False)
    for axes, panels in zip(grid, rows):
        for axis, panel in zip(axes, panels):
            draw_fit_panel(axis, panel)
        for axis in axes[len(panels) :]:
            axis.axis("off")
    figure.suptitle(title)
    return figure


def draw_fit_panel(axis, panel: FitPanel) -> None:
    if panel.points:
        axis.scatter(*zip(*panel.points), s=14, color="C0", alpha=0.6, label="run")
    if panel.means:
        axis.plot(*zip(*panel.means), "D", color="C1", markersize=6, label="mean over seeds")
    if panel.slope is not None:
        xs = [min(x for x, _ in panel.points), max(x for x, _ in panel.points)]
        axis.plot(xs, [panel.intercept + panel.slope * x for x in xs], "-", color="C3", linewidth=1.5, label="fit")
    lines = [*panel.title.splitlines(), *([panel.note] if panel.note else [])]
    axis.set_title("\n".join(textwrap.fill(line, 48) for line in lines), fontsize="small")
    readable_axes(axis, panel.xlabel, panel.ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="x-small", loc="best")


def plot_fits(rows: Sequence[Sequence[FitPanel]], output_path: str | os.PathLike) -> Path:
    """report_fit.png: fit_figure's panels as one PNG at `output_path`."""
    return save_png(fit_figure(rows), output_path)
