"""`prefopt report SWEEP_DIR`: one row per job of a Hydra multirun (job dirs 0, 1, 2, ...) with how each
run moved the probe log-probs (chosen, rejected, others, greedy) and its final eval reward accuracy.

Writes report.md, report.csv and the overlay plot report.png into the sweep dir and prints the table.
A job that crashed (no summary.json, or an error.txt) is a `failed` row, never a crash of the report.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Optional

from prefopt.fileutil import atomic_write_text
from prefopt.plots import RunDirError, plot_runs, run_label, run_overrides
from prefopt.tracking import DYNAMICS_FILE, SUMMARY_FILE, read_jsonl
from prefopt.worker import ERROR_FILE


# column -> summary.json key
SUMMARY_COLUMNS = {
    "dChosen": "delta/chosen",
    "dRejected": "delta/rejected",
    "dOthers": "delta/others",
    "dGreedy": "delta/greedy",
    "eval_accuracy": "eval/rewards/accuracy",
    "steps": "steps",
}
COLUMNS = ("job", "overrides", *SUMMARY_COLUMNS, "status")


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job subdirs (named 0, 1, 2, ...) in job order."""
    if not sweep_dir.is_dir():
        raise RunDirError(f"{sweep_dir}: not a directory; give a sweep dir made by `prefopt train -m`")
    jobs = sorted((path for path in sweep_dir.iterdir() if path.is_dir() and path.name.isdigit()), key=lambda path: int(path.name))
    if not jobs:
        raise RunDirError(f"{sweep_dir}: no job dirs (0, 1, 2, ...) inside; give the sweep dir of a `prefopt train -m` run")
    return jobs


def read_summary(job_dir: Path) -> Optional[dict[str, Any]]:
    path = job_dir / SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def job_row(job_dir: Path) -> dict[str, Any]:
    summary = read_summary(job_dir)
    failed = summary is None or (job_dir / ERROR_FILE).exists()
    row: dict[str, Any] = {"job": int(job_dir.name), "overrides": run_label(job_dir)}
    row |= {column: (summary or {}).get(key) for column, key in SUMMARY_COLUMNS.items()}
    row["status"] = "failed" if failed else "ok"
    return row


def plot_labels(jobs: list[Path]) -> list[str]:
    """`job N: <the overrides not shared by every job>`: a sweep's legend shows what differs, not ten
    repeats of the common settings."""
    overrides = [run_overrides(job) for job in jobs]
    shared = set.intersection(*(set(items) for items in overrides)) if len(jobs) > 1 else set()
    return [f"job {job.name}: " + " ".join(item for item in items if item not in shared) for job, items in zip(jobs, overrides)]


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
    jobs = job_dirs(sweep_dir)
    rows = [job_row(job) for job in jobs]
    atomic_write_text(sweep_dir / "report.md", f"# Sweep report: {sweep_dir}\n\n" + markdown_table(rows))
    atomic_write_text(sweep_dir / "report.csv", csv_text(rows))
    with_dynamics = [job for job in jobs if read_jsonl(job / DYNAMICS_FILE)]
    plot = None
    if with_dynamics:
        plot = plot_runs(with_dynamics, sweep_dir / "report.png", f"Learning dynamics: sweep {sweep_dir.name}", plot_labels(with_dynamics))
    return rows, plot


def report_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="prefopt report",
        description="Tabulate a sweep (prefopt train -m): per job the probe log-prob changes, eval accuracy and status; "
        "writes report.md, report.csv and report.png into the sweep dir.",
    )
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", type=Path, help="the multirun dir holding job dirs 0, 1, 2, ...")
    args = parser.parse_args(argv)
    try:
        rows, plot = build_report(args.sweep_dir)
    except RunDirError as error:
        print(f"prefopt: error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    failed = sum(row["status"] == "failed" for row in rows)
    print(f"{len(rows)} jobs, {failed} failed; wrote report.md, report.csv" + (", report.png" if plot else " (no dynamics.jsonl: no plot)")
          + f" in {args.sweep_dir}")
    return 0
