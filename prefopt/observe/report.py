"""`prefopt report SWEEP_DIR` (its options: prefopt/cli.py): one row per job of a Hydra multirun (job dirs 0, 1,
2, ...) with how each run moved the probe log-probs (chosen, rejected, others, greedy) and its final eval reward
accuracy.

Writes report.md, report.csv and the overlay plot report.png into the sweep dir and prints the table.
A job that crashed (no summary.json, or an error.txt) is a `failed` row, never a crash of the report. An
interrupted sweep lists every job it planned (Hydra's multirun.yaml: the basic sweeper's cartesian product of
the sweep's overrides): a job whose run dir lock is held is `running`, one without a dir `never ran`
(prefopt/observe/sweep_status.py reads the rows).

`--group-by KEYS` adds evidence over seeds: jobs that differ only in trainer.seed form a group, and each
group gets n, mean, std and a 95% Student-t interval for every metric (prefopt/observe/stats.py);
`--baseline KEY=VALUE` adds each group's paired difference to that group, seed by seed. Writes
report_groups.md, report_groups.csv and report_bands.png (mean trajectory and band per group): the groups are
prefopt/observe/seed_groups.py's, the files prefopt/observe/group_report.py's.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional

from prefopt.core.fileutil import atomic_write_text
from prefopt.core.runfiles import (
    DYNAMICS_FILE,
    REPORT_BANDS_PLOT,
    REPORT_CSV,
    REPORT_GROUPS_CSV,
    REPORT_GROUPS_MD,
    REPORT_MD,
    REPORT_PLOT,
)
from prefopt.observe.group_report import build_group_report
from prefopt.observe.plots import plot_runs, run_overrides
from prefopt.observe.sweep_status import NEVER_RAN, RUNNING, SUMMARY_COLUMNS, sweep_rows
from prefopt.observe.tracking import read_jsonl

COLUMNS = ("job", "overrides", *SUMMARY_COLUMNS, "status")


def plot_labels(jobs: list[Path]) -> list[str]:
    """`job N: <the overrides not shared by every job>`: a sweep's legend shows what differs, not ten
    repeats of the common settings."""
    overrides = [run_overrides(job) for job in jobs]
    shared = set.intersection(*(set(items) for items in overrides)) if len(jobs) > 1 else set()
    return [
        f"job {job.name}: " + " ".join(item for item in items if item not in shared)
        for job, items in zip(jobs, overrides)
    ]


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row[column]).replace("|", "\\|") for column in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({column: "" if row[column] is None else row[column] for column in COLUMNS} for row in rows)
    return buffer.getvalue()


def build_report(sweep_dir: Path) -> tuple[list[dict[str, Any]], Optional[Path]]:
    """(rows, path of report.png or None when no job recorded dynamics); writes report.md/.csv/.png."""
    sweep_dir = Path(sweep_dir)
    rows, jobs = sweep_rows(sweep_dir)
    atomic_write_text(sweep_dir / REPORT_MD, f"# Sweep report: {sweep_dir}\n\n" + markdown_table(rows))
    atomic_write_text(sweep_dir / REPORT_CSV, csv_text(rows))
    with_dynamics = [job for job in jobs if read_jsonl(job / DYNAMICS_FILE)]
    plot = None
    if with_dynamics:
        plot = plot_runs(
            with_dynamics,
            sweep_dir / REPORT_PLOT,
            f"Learning dynamics: sweep {sweep_dir.name}",
            plot_labels(with_dynamics),
        )
    return rows, plot


def report_sweep(sweep_dir: Path, group_by: list[str], baseline: Optional[list[str]] = None) -> str:
    """Write the sweep's report files (with `group_by`, the groups' too, after checking the groups before writing
    anything); returns what `prefopt report` prints: the table, the groups' tables, and what it wrote."""
    groups = build_group_report(sweep_dir, group_by, baseline) if group_by else None  # refuses before writing the rest
    rows, plot = build_report(sweep_dir)
    shown = [markdown_table(rows)]
    written = [REPORT_MD, REPORT_CSV] + ([REPORT_PLOT] if plot else [])
    if groups is not None:
        shown.append(groups.markdown)
        written += [REPORT_GROUPS_MD, REPORT_GROUPS_CSV] + ([REPORT_BANDS_PLOT] if groups.plot else [])
    failed = sum(row["status"] == "failed" for row in rows)
    unfinished = [
        f"{sum(row['status'] == status for row in rows)} {status}"
        for status in (RUNNING, NEVER_RAN)
        if any(row["status"] == status for row in rows)
    ]
    no_plot = "" if plot else " (no dynamics.jsonl: no plot)"
    statuses = ", ".join([f"{failed} failed", *unfinished])
    done = f"{len(rows)} jobs, {statuses}; wrote {', '.join(written)}{no_plot} in {sweep_dir}"
    return "\n".join([*shown, done])
