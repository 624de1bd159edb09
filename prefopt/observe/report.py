"""`prefopt report DIR` (its options: prefopt/cli.py): one row per job of a Hydra multirun (job dirs 0, 1, 2, ...),
or per run dir found in any other folder (ad-hoc runs, several sweeps: sweep_status.run_dirs_under), with how each
run moved the probe log-probs (chosen, rejected, others, greedy) and its final eval reward accuracy. The table names
only the settings that differ between the rows (prefopt/observe/run_settings.py); those all share are stated once
above it (report.csv keeps each row's whole command line).

Writes report.md, report.csv and report.png (the runs' training curves and probe panels, prefopt/observe/curves.py)
into DIR and prints the table.
A job that crashed (no summary.json, or an error.txt) is a `failed` row, never a crash of the report. An
interrupted sweep lists every job it planned (Hydra's multirun.yaml: the basic sweeper's cartesian product of
the sweep's overrides): a job whose run dir lock is held is `running`, one without a dir `never ran`
(prefopt/observe/sweep_status.py reads the rows).

`--group-by KEYS` adds evidence over seeds: jobs that differ only in trainer.seed form a group, and each
group gets n, mean, std and a 95% Student-t interval for every metric (prefopt/observe/stats.py);
`--baseline KEY=VALUE` adds each group's paired difference to that group, seed by seed. Writes
report_groups.md, report_groups.csv and report_bands.png (mean trajectory and band per group): the groups are
prefopt/observe/seed_groups.py's, the files prefopt/observe/group_report.py's. `--fit KEY` (a numeric group-by key)
adds the least-squares line of each headline metric on KEY per stratum of the other keys (prefopt/observe/fits.py):
a section of report_groups.md, report_fit.csv and report_fit.png.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional

from prefopt.core.fileutil import atomic_write_text
from prefopt.core.runfiles import (
    REPORT_BANDS_PLOT,
    REPORT_CSV,
    REPORT_FIT_CSV,
    REPORT_FIT_PLOT,
    REPORT_GROUPS_CSV,
    REPORT_GROUPS_MD,
    REPORT_MD,
    REPORT_PLOT,
)
from prefopt.observe.curves import RunCurves, curves_figure, figure_title, read_curves
from prefopt.observe.group_report import build_group_report
from prefopt.observe.plots import RunDirError, save_png
from prefopt.observe.run_settings import SettingsDiff, settings_diff
from prefopt.observe.seed_groups import Job, planned_job, read_job
from prefopt.observe.sweep_status import NEVER_RAN, RUNNING, SUMMARY_COLUMNS, is_sweep_dir, report_rows

COLUMNS = ("job", "overrides", *SUMMARY_COLUMNS, "status")  # report.csv: each row's whole command line
TABLE_COLUMNS = ("job", "differs", *SUMMARY_COLUMNS, "status")  # report.md and the printed table: what differs


def row_job(row: dict[str, Any]) -> Job:
    """The row's run as grouping reads it (its settings); a job that never ran, or whose files are damaged, by the
    overrides it was planned with."""
    if row["dir"] is not None:
        try:
            return read_job(row["dir"])
        except RunDirError:
            pass
    return planned_job(row.get("planned") or [])


def mark_differences(rows: list[dict[str, Any]]) -> SettingsDiff:
    """Each row's `differs` (its settings that not every row shares); returns the split (shared ones once)."""
    diff = settings_diff([row_job(row) for row in rows])
    for index, row in enumerate(rows):
        row["differs"] = diff.label(index)
    return diff


def plot_label(row: dict[str, Any]) -> str:
    """`job N: <what differs>` in a sweep, `<path>: <what differs>` in a folder of runs."""
    name = f"job {row['job']}" if isinstance(row["job"], int) else row["job"]
    return f"{name}: {row['differs']}" if row["differs"] else name


def drawable(rows: list[dict[str, Any]]) -> list[RunCurves]:
    """The rows' runs that logged something to draw, labelled by plot_label."""
    runs = []
    for row in rows:
        if row["dir"] is None:
            continue
        try:
            runs.append(read_curves(row["dir"], plot_label(row)))
        except RunDirError:  # nothing logged yet (failed early, still starting) or a damaged file: a row, no lines
            continue
    return runs


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], shared: str = "") -> str:
    """The rows' table, with the settings every row shares stated once above it."""
    lines = [f"Shared by every row: {shared}", ""] if shared else []
    lines += ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        cells = (format_cell(row[column]).replace("|", "\\|") for column in TABLE_COLUMNS)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({column: "" if row[column] is None else row[column] for column in COLUMNS} for row in rows)
    return buffer.getvalue()


def build_report(directory: Path) -> tuple[list[dict[str, Any]], Optional[Path]]:
    """(rows, path of report.png or None when no run logged anything to draw); writes report.md/.csv/.png."""
    rows, plot, _ = write_report(directory)
    return rows, plot


def write_report(directory: Path) -> tuple[list[dict[str, Any]], Optional[Path], str]:
    """(rows, path of report.png or None, the settings every row shares); writes report.md/.csv/.png into
    `directory` (a sweep dir or a folder of run dirs)."""
    directory = Path(directory)
    rows, _ = report_rows(directory)
    diff = mark_differences(rows)
    kind = "sweep" if is_sweep_dir(directory) else "runs in"
    heading = f"# {'Sweep report' if kind == 'sweep' else 'Report of the runs in'}: {directory}\n\n"
    atomic_write_text(directory / REPORT_MD, heading + markdown_table(rows, diff.shared_text))
    atomic_write_text(directory / REPORT_CSV, csv_text(rows))
    runs = drawable(rows)
    plot = None
    if runs:
        title = figure_title(f"{kind} {directory.resolve().name}", diff.shared_text, len(rows) > 1)
        plot = save_png(curves_figure(runs, title), directory / REPORT_PLOT)
    return rows, plot, diff.shared_text


def report_sweep(
    sweep_dir: Path, group_by: list[str], baseline: Optional[list[str]] = None, fit: Optional[str] = None
) -> str:
    """Write the sweep's report files (with `group_by`, the groups' too, and with `fit` the fit's, after checking the
    groups before writing anything); returns what `prefopt report` prints: the table, the groups' tables (and fit),
    and what it wrote."""
    # refuses before writing the rest
    groups = build_group_report(sweep_dir, group_by, baseline, fit) if group_by else None
    rows, plot, shared = write_report(sweep_dir)
    shown = [markdown_table(rows, shared)]
    written = [REPORT_MD, REPORT_CSV] + ([REPORT_PLOT] if plot else [])
    if groups is not None:
        shown.append(groups.markdown)
        written += [REPORT_GROUPS_MD, REPORT_GROUPS_CSV] + ([REPORT_BANDS_PLOT] if groups.plot else [])
        if fit:
            written += [REPORT_FIT_CSV] + ([REPORT_FIT_PLOT] if groups.fit_plot else [])
    failed = sum(row["status"] == "failed" for row in rows)
    unfinished = [
        f"{sum(row['status'] == status for row in rows)} {status}"
        for status in (RUNNING, NEVER_RAN)
        if any(row["status"] == status for row in rows)
    ]
    no_plot = "" if plot else " (no run logged a step: no plot)"
    statuses = ", ".join([f"{failed} failed", *unfinished])
    noun = "jobs" if is_sweep_dir(Path(sweep_dir)) else "runs"
    done = f"{len(rows)} {noun}, {statuses}; wrote {', '.join(written)}{no_plot} in {sweep_dir}"
    return "\n".join([*shown, done])
