"""Start-up of the `prefopt` commands that only read files or print help: wall time, peak RSS and how many modules
each imports (torch among them or not), as a table. Nothing is asserted; the figures go in notes and README.

    .venv/bin/python scripts/bench_startup.py                       # prefopt --help, report/plot/train --help
    .venv/bin/python scripts/bench_startup.py --runs 9 --command "report --help" --command "train --help"

Each command runs --runs times in a fresh `python -m prefopt.cli` process (the installed `prefopt` script runs the
same module); the wall time is the median, the RSS the largest of its runs (each child's own rusage). Run it on an idle
machine: a shared core moves the wall times, not the module counts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_COMMANDS = ("--help", "report --help", "plot --help", "train --help")
HEAVY = ("torch", "transformers", "datasets", "deepspeed")


def run_once(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one `python -m prefopt.cli ARGS` (os.wait4: this child's own rusage)."""
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "prefopt.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"prefopt {' '.join(args)} exited {child.returncode}")
    return wall, usage.ru_maxrss / 1024


def imported_modules(args: list[str]) -> tuple[int, list[str]]:
    """How many modules the command imports, and which of HEAVY (from python -X importtime)."""
    trace = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "prefopt.cli", *args], cwd=REPO, capture_output=True, text=True
    ).stderr
    names = [line.split("|")[-1].strip() for line in trace.splitlines() if line.startswith("import time:")][1:]
    return len(names), [heavy for heavy in HEAVY if heavy in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--command", action="append", help="arguments after `prefopt` (repeatable)")
    parser.add_argument("--runs", type=int, default=5, help="runs per command (median wall time)")
    args = parser.parse_args()
    print("| command | wall s (median) | peak RSS MB | modules imported | heavy libraries |")
    print("|---|---|---|---|---|")
    for command in args.command or DEFAULT_COMMANDS:
        argv = command.split()
        timings = [run_once(argv) for _ in range(args.runs)]
        count, heavy = imported_modules(argv)
        wall = statistics.median(wall for wall, _ in timings)
        rss = max(rss for _, rss in timings)
        print(f"| prefopt {command} | {wall:.2f} | {rss:.0f} | {count} | {', '.join(heavy) or 'none'} |")


if __name__ == "__main__":
    main()
