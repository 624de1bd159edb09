"""What `prefopt inspect` leaves in its run dir, from the inspected table alone (no torch): the table as parquet and
CSV, histograms of the columns, a scatter of CHES against the gate (and, when a trained policy was scored, of CHES
against the chosen log-prob change, the likelihood-displacement picture of Razin et al. 2024), and the console
summary: quantiles per split, Spearman correlations with the change, and the highest-CHES pairs as text.

A table is a dict of equally long columns: `split` (train | eval), `index` (the pair's position in its split), the
inspected columns (train/inspection.py) and, with a policy, policy_chosen_logps, policy_rejected_logps,
chosen_change, rejected_change and visits (how often the run drew the pair).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prefopt.core.fileutil import atomic_write_bytes, atomic_write_text
from prefopt.core.runfiles import (
    INSPECTION_CSV,
    INSPECTION_HISTOGRAMS,
    INSPECTION_PARQUET,
    INSPECTION_SCATTER,
    INSPECTION_SUMMARY,
)
from prefopt.observe.plots import readable_axes, save_png
from prefopt.observe.stats import spearman

HISTOGRAM_COLUMNS = (
    ("ches_norm", "length-normalized CHES"),
    ("ches", "CHES"),
    ("ref_chosen_mean", "chosen: mean token log-prob (nats)"),
    ("ref_rejected_mean", "rejected: mean token log-prob (nats)"),
    ("ref_margin", "reference margin: chosen - rejected (nats)"),
    ("token_overlap", "token overlap of the responses (0-1)"),
)
SUMMARY_COLUMNS = ("ches_norm", "ches", "ref_chosen_mean", "ref_rejected_mean", "ref_margin", "token_overlap")
CHANGE_COLUMN = "chosen_change"
QUANTILES = (0.1, 0.5, 0.9)
SCATTER_GROUPS = (("train", "o", "train"), ("eval", "^", "eval"))  # (legend, marker, split)


def table_rows(table: dict[str, list], where: Sequence[bool]) -> dict[str, list]:
    return {name: [value for value, keep in zip(values, where) if keep] for name, values in table.items()}


def split_rows(table: dict[str, list], split: str) -> dict[str, list]:
    return table_rows(table, [value == split for value in table["split"]])


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), so the table reads as torch.quantile."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def gate_columns(table: dict[str, list]) -> list[str]:
    return [name for name in table if name.startswith("gate_")]


def write_table(run_dir: Path, table: dict[str, list]) -> None:
    """inspection.parquet and inspection.csv, each written atomically."""
    import pandas

    frame = pandas.DataFrame(table)
    parquet = io.BytesIO()
    frame.to_parquet(parquet, index=False)
    atomic_write_bytes(run_dir / INSPECTION_PARQUET, parquet.getvalue())
    atomic_write_text(run_dir / INSPECTION_CSV, frame.to_csv(index=False))


def histogram_figure(table: dict[str, list]) -> Figure:
    """One panel per column in HISTOGRAM_COLUMNS and per gate, train and eval overlaid."""
    panels = [(name, label) for name, label in HISTOGRAM_COLUMNS if name in table]
    panels += [(name, f"{name}: gate at step 0 (0-1)") for name in gate_columns(table)]
    columns = 4
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for axis, (name, label) in zip(axes, panels):
        for split in ("train", "eval"):
            values = [v for v, s in zip(table[name], table["split"]) if s == split and math.isfinite(v)]
            if values:
                axis.hist(values, bins=30, alpha=0.6, label=f"{split} ({len(values)})")
        axis.set_title(name)
        readable_axes(axis, label, "pairs")
        axis.legend(fontsize="small")
        axis.grid(alpha=0.3)
    for axis in axes[len(panels) :]:
        axis.axis("off")
    figure.suptitle("prefopt inspect: the pairs before training")
    return figure


def scatter_figure(table: dict[str, list]) -> Figure:
    """CHES (normalized) against each gate's step-0 value; with a scored policy, also against the chosen change."""
    targets = [(name, f"{name} at step 0 (0-1)") for name in gate_columns(table)]
    if CHANGE_COLUMN in table:
        targets.append((CHANGE_COLUMN, "chosen log-prob change, policy - reference (nats)"))
    figure = Figure(figsize=(5.0 * max(len(targets), 1), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, max(len(targets), 1), squeeze=False).flatten()
    visits = table.get("visits", [1] * len(table["split"]))
    groups = [(label, marker, [s == split for s in table["split"]]) for label, marker, split in SCATTER_GROUPS]
    if "visits" in table:  # with a scored policy: the trained pairs (the correlation's) apart from the others
        groups[0] = ("train, drawn by the run", "o", [s == "train" and v > 0 for s, v in zip(table["split"], visits)])
        groups.insert(1, ("train, not drawn", "x", [s == "train" and v == 0 for s, v in zip(table["split"], visits)]))
    for axis, (name, label) in zip(axes, targets):
        for group, marker, where in groups:
            points = [(x, y) for x, y, keep in zip(table["ches_norm"], table[name], where) if keep and math.isfinite(y)]
            if points:
                xs, ys = zip(*points)
                axis.scatter(xs, ys, s=12, alpha=0.6, marker=marker, label=f"{group} ({len(points)})")
        if name == CHANGE_COLUMN:
            axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set_title(f"{name} vs length-normalized CHES")
        readable_axes(axis, "ches_norm (higher: responses look alike to the model)", label)
        axis.legend(fontsize="small")
        axis.grid(alpha=0.3)
    if not targets:
        axes[0].axis("off")
    return figure


def correlation_lines(table: dict[str, list]) -> list[str]:
    """Spearman rho (95% interval) of CHES against the chosen change over the train pairs the run drew."""
    if CHANGE_COLUMN not in table:
        return []
    drawn = table_rows(table, [s == "train" and v > 0 for s, v in zip(table["split"], table["visits"])])
    lines = []
    for name in ("ches", "ches_norm"):
        if len(drawn[name]) < 4:
            return ["too few trained pairs (< 4) for a correlation"]
        result = spearman(drawn[name], drawn[CHANGE_COLUMN])
        lines.append(
            f"Spearman({name}, chosen_change) over the {result.n} trained pairs: {result.rho:+.3f} "
            f"(95% CI {result.ci_low:+.3f} to {result.ci_high:+.3f})"
        )
    return lines


def summary_text(table: dict[str, list], top_pairs: Sequence[dict[str, Any]]) -> str:
    """The console summary: quantiles per split and column, correlations, and the highest-CHES pairs as text."""
    lines = []
    shown = [name for name in SUMMARY_COLUMNS if name in table] + gate_columns(table)
    shown += [name for name in (CHANGE_COLUMN, "rejected_change") if name in table]
    for split in ("train", "eval"):
        rows = split_rows(table, split)
        if not rows["split"]:
            continue
        lines.append(f"{split}: {len(rows['split'])} pairs")
        lines.append(f"  {'column':<18}" + "".join(f"{f'p{round(q * 100)}':>10}" for q in QUANTILES))
        for name in shown:
            values = [value for value in rows[name] if math.isfinite(value)]
            if values:
                lines.append(f"  {name:<18}" + "".join(f"{quantile(values, q):>10.4g}" for q in QUANTILES))
    lines += correlation_lines(table)
    if top_pairs:
        lines.append(f"the {len(top_pairs)} train pairs with the highest ches_norm (likeliest to displace the chosen):")
        for pair in top_pairs:
            lines.append(f"  #{pair['index']} ches_norm {pair['ches_norm']:.4g}  prompt: {pair['prompt']!r}")
            lines.append(f"      chosen:   {pair['chosen']!r}")
            lines.append(f"      rejected: {pair['rejected']!r}")
    return "\n".join(lines)


def write_inspection(run_dir: Path, table: dict[str, list], top_pairs: Sequence[dict[str, Any]]) -> str:
    """Every file of an inspection into run_dir; returns the console summary (also in inspection.md)."""
    write_table(run_dir, table)
    save_png(histogram_figure(table), run_dir / INSPECTION_HISTOGRAMS)
    save_png(scatter_figure(table), run_dir / INSPECTION_SCATTER)
    text = summary_text(table, top_pairs)
    atomic_write_text(run_dir / INSPECTION_SUMMARY, text + "\n")
    return text
