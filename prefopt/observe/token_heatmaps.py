"""Per-token heatmaps of the probes (dynamics.token_views): for one probe, how each token's log-prob moved from
step 0, step by step, on its chosen response, its rejected response and the greedy path (the argmax at each
chosen position). The squeezing effect reads off them at a glance: red where a token lost probability, blue
where it gained, one shared color scale per figure so the three panels compare.

Drawn from the run dir's token_views.jsonl alone: the run writes them at its end (train/build.py BuiltRun.finish)
and plot_token_views(run_dir) redraws them any time. No torch here (observe/).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prefopt.core.runfiles import TOKEN_VIEWS_DIR, TOKEN_VIEWS_FILE, token_view_plot
from prefopt.observe.plots import RunDirError, save_png
from prefopt.observe.tracking import read_jsonl

PANELS = (
    ("chosen", "chosen response"),
    ("rejected", "rejected response"),
    ("greedy", "greedy path: the argmax token at each chosen position (label: step 0's -> the last step's)"),
)
COLOR_LABEL = "change of log-prob from step 0 (nats)"
MAX_TICK_LABELS = 150  # past this many tokens only every k-th is labelled (the cells are all drawn)
MAX_STEP_LABELS = 25


@dataclass
class TokenPanel:
    """One kind of one probe: deltas[step row][position], the steps in order, one label per position."""

    steps: list[int]
    deltas: list[list[float]]
    labels: list[str]


def load_token_views(run_dir: str | os.PathLike) -> dict[int, dict[str, TokenPanel]]:
    """probe -> kind -> its panel, from run_dir's token_views.jsonl; RunDirError when there is none."""
    path = Path(run_dir) / TOKEN_VIEWS_FILE
    rows = read_jsonl(path)
    if not rows:
        raise RunDirError(f"{path}: not found or empty; token views come from a run with dynamics.token_views=true")
    cells: dict[tuple[int, str], dict[int, dict[int, dict]]] = {}  # (probe, kind) -> step -> position -> row
    for row in rows:
        cells.setdefault((row["probe"], row["kind"]), {}).setdefault(row["step"], {})[row["position"]] = row
    views: dict[int, dict[str, TokenPanel]] = {}
    for (probe, kind), by_step in cells.items():
        steps = sorted(by_step)
        width = max(len(positions) for positions in by_step.values())
        deltas = [[cell_value(by_step[step].get(position)) for position in range(width)] for step in steps]
        first, last = by_step[steps[0]], by_step[steps[-1]]
        labels = [position_label(first.get(position), last.get(position), kind) for position in range(width)]
        views.setdefault(probe, {})[kind] = TokenPanel(steps, deltas, labels)
    return views


def cell_value(row: Optional[dict]) -> float:
    """A row's delta; NaN (drawn blank) where a position has no row or a non-finite value (written as null)."""
    return row["delta"] if row is not None and row.get("delta") is not None else math.nan


def position_label(first: Optional[dict], last: Optional[dict], kind: str) -> str:
    """The token's text; on the greedy path, 'a -> b' where the argmax changed from the first step to the last."""
    start, end = (token_label(row["token"]) if row is not None else "" for row in (first, last))
    if kind == "greedy" and first is not None and last is not None and first["token_id"] != last["token_id"]:
        return f"{start}→{end}"
    return end or start


def token_label(text: str, limit: int = 14) -> str:
    """A token's text made visible on an axis: spaces as ␣, newlines and tabs escaped, $ kept literal (matplotlib
    would start math mode), long tokens cut."""
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r").replace(" ", "␣").replace("$", r"\$")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def token_heatmap_figure(probe: int, panels: dict[str, TokenPanel]) -> Figure:
    """The three panels of one probe, stacked, cells the same width in each (x: response position, labelled with
    its token; y: probe step), colored by the change from step 0 on a diverging map centered at 0 and shared."""
    kinds = [(kind, title) for kind, title in PANELS if kind in panels]
    positions = max(len(panels[kind].labels) for kind, _ in kinds)
    steps = max(len(panels[kind].steps) for kind, _ in kinds)
    finite = [abs(value) for kind, _ in kinds for row in panels[kind].deltas for value in row if math.isfinite(value)]
    scale = max(finite, default=0.0) or 1e-6  # symmetric around 0; all-zero (step 0 alone) still draws
    figure = Figure(
        figsize=(min(max(0.17 * positions + 3.5, 9.0), 48.0), len(kinds) * min(0.2 * steps + 2.1, 9.0) + 0.8),
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(kinds), 1, squeeze=False)[:, 0]
    image = None
    for axis, (kind, title) in zip(axes, kinds):
        panel = panels[kind]
        image = axis.imshow(
            panel.deltas, aspect="auto", cmap="RdBu", vmin=-scale, vmax=scale, interpolation="nearest", origin="upper"
        )
        axis.set_xlim(-0.5, positions - 0.5)
        every = max(1, math.ceil(len(panel.labels) / MAX_TICK_LABELS))
        ticks = list(range(0, len(panel.labels), every))
        axis.set_xticks(ticks, [panel.labels[tick] for tick in ticks], rotation=90, fontsize=7)
        every_step = max(1, math.ceil(len(panel.steps) / MAX_STEP_LABELS))
        rows = list(range(0, len(panel.steps), every_step))
        axis.set_yticks(rows, [str(panel.steps[row]) for row in rows], fontsize=8)
        axis.set_ylabel("training step")
        axis.set_title(f"{title} ({len(panel.labels)} tokens)", fontsize=10, loc="left")
    axes[-1].set_xlabel("response token (position order)")
    figure.colorbar(image, ax=list(axes), label=COLOR_LABEL, shrink=0.9, pad=0.01)
    figure.suptitle(f"Probe {probe}: per-token log-prob change from step 0 (red: fell, blue: rose)")
    return figure


def plot_token_views(
    run_dir: str | os.PathLike, num_probes: Optional[int] = None, output_dir: Optional[str | os.PathLike] = None
) -> list[Path]:
    """The heatmaps of the first `num_probes` probes (None: every probe) from run_dir's token_views.jsonl, one PNG
    each in output_dir (default run_dir/token_views/); returns their paths."""
    views = load_token_views(run_dir)
    directory = Path(output_dir) if output_dir is not None else Path(run_dir) / TOKEN_VIEWS_DIR
    return [
        save_png(token_heatmap_figure(probe, views[probe]), directory / token_view_plot(probe))
        for probe in sorted(views)[:num_probes]
    ]
