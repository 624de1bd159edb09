"""hardware=auto's estimate against measured runs: per config, the estimated peak memory and seconds per step
(prefopt/run/resources.py, from the data's lengths, for this machine's `cpu` preset) beside the peak RSS and the
median step time of the same config trained with hardware=cpu.

    .venv/bin/python scripts/bench_estimate.py                          # main job, gate_dpo_local example, tiny model
    .venv/bin/python scripts/bench_estimate.py --tiny --steps 4         # the machinery in seconds: all on tiny_llama
    .venv/bin/python scripts/bench_estimate.py --only main --steps 10 --out /tmp/bench_estimate

Configs (CONFIGS): `main` = `prefopt train` as configured (DPO, SmolLM2-135M, arith, 30 steps of 4 pairs);
`gate_dpo_local` = prefopt/examples/gate_dpo_local.sh's train command (Gate-DPO, SmolLM2-135M, the 24-pair UltraFeedback
sample, 20 steps); `tiny` = the main job on the tiny random Llama. --steps N sets trainer.max_steps for all (default:
each config's own); --tiny puts every config on model=tiny_llama.

Measured: each run in a fresh process under a wrapper whose getrusage(RUSAGE_CHILDREN).ru_maxrss is that run's peak
RSS (as scripts/benchmark.py); the step time is the median gap between consecutive `step N/M` lines' log timestamps
after step 1 (warm-up; a gap that holds a probe or an eval is an outlier the median drops), W&B disabled, plain
console. Run it on a quiet machine: on a loaded one the times are worthless (peak RSS still holds). GB = 2^30 bytes.
The table prints and goes to OUT/bench_estimate.md, the numbers to OUT/bench_estimate.json. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from prefopt.core.runfiles import SUMMARY_FILE, TRAIN_LOG  # noqa: E402
from prefopt.run.data_preview import compose_run_config  # noqa: E402
from prefopt.run.examples import DATA_DIR, EXAMPLES_DIR  # noqa: E402
from prefopt.run.hardware_plan import estimated_run, preset_values  # noqa: E402
from prefopt.run.resources import GB, cpu_tflops, estimate_memory, limits_from, step_seconds, this_machine  # noqa: E402

CONFIGS = {
    "main": [],
    # prefopt/examples/gate_dpo_local.sh's overrides (its DATA default: the shipped sample)
    "gate_dpo_local": [
        "loss=gate_dpo",
        "model=smollm2_135m",
        "dataset=ultrafeedback",
        f"dataset.path={EXAMPLES_DIR / DATA_DIR / 'ultrafeedback_sample.jsonl'}",
        "dataset.eval_fraction=0.25",
        "trainer.max_steps=20",
        "trainer.lr=1e-5",
        "trainer.greedy_eval_examples=4",
    ],
    "tiny": ["model=tiny_llama"],
}
STEP_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[prefopt\]\[INFO\] - step (\d+)/\d+ \|")


def estimate(overrides: list[str]) -> dict:
    """What hardware=auto estimates for this config on this machine's CPU."""
    cfg = compose_run_config(overrides)
    machine, limits = this_machine(), limits_from(cfg.hardware)
    run = estimated_run(cfg, machine, limits)
    return {
        "estimated_peak_gb": estimate_memory(run, preset_values("cpu")).total / GB,
        "estimated_step_s": step_seconds(run, cpu_tflops(machine, limits)),
        "basis": run.tokens_basis,
    }


def measure(name: str, overrides: list[str], out_dir: Path) -> dict:
    """Train the config with hardware=cpu in a fresh process: its peak RSS and median step time."""
    run_dir = out_dir / name
    peak_file = out_dir / f"{name}.peak_kb"
    wrapper = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
        "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
    )
    command = [
        *(sys.executable, "-m", "prefopt.cli", "train", *overrides),
        *("hardware=cpu", "logger.wandb.mode=disabled", "logger.console=plain", f"hydra.run.dir={run_dir}"),
    ]
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-c", wrapper, str(peak_file), *command], cwd=REPO, capture_output=True, text=True
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"status": f"failed ({lines[-1] if lines else result.returncode})"}
    return {
        "status": "ok",
        "wall_s": time.time() - started,
        "measured_peak_gb": int(peak_file.read_text()) / 2**20,
        "measured_step_s": median_step_seconds(run_dir),
    }


def median_step_seconds(run_dir: Path) -> Optional[float]:
    """The median gap between consecutive step lines after step 1; with fewer steps, the run's train seconds per step
    (evals included)."""
    stamps = {}
    log_file = next(path for path in (run_dir / "cli.log", run_dir / TRAIN_LOG) if path.is_file())  # Hydra's, or ours
    for line in log_file.read_text().splitlines():
        match = STEP_LINE.match(line)
        if match:
            stamps[int(match.group(2))] = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    gaps = [(stamps[step] - stamps[step - 1]).total_seconds() for step in sorted(stamps) if step - 1 in stamps]
    if len(gaps) >= 2:
        return statistics.median(gaps[1:] if len(gaps) > 2 else gaps)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    return summary["train_seconds"] / summary["steps"] if summary.get("steps") else None


def table(rows: list[dict]) -> str:
    number = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    lines = [
        "| config | estimated peak GB | measured peak RSS GB | estimated s/step | measured s/step | tokens counted |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {number(row.get('estimated_peak_gb'), '.2f')} | "
            f"{number(row.get('measured_peak_gb'), '.2f')} | {number(row.get('estimated_step_s'), '.3g')} | "
            f"{number(row.get('measured_step_s'), '.3g')} | {row.get('basis', row.get('status'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps for every config")
    parser.add_argument("--tiny", action="store_true", help="every config on model=tiny_llama (a machinery check)")
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma list of configs: " + ", ".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=None, help="run dirs and results (default: a temporary dir)")
    args = parser.parse_args()
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="bench_estimate_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only.split(","):
        overrides = [
            *CONFIGS[name],
            *(["model=tiny_llama"] if args.tiny else []),
            *([f"trainer.max_steps={args.steps}"] if args.steps else []),
        ]
        row = {"config": name, "overrides": overrides, **estimate(overrides)}
        row |= measure(name, overrides, out_dir)
        rows.append(row)
        print(f"{name}: {row}", file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    (out_dir / "bench_estimate.md").write_text(text + "\n")
    (out_dir / "bench_estimate.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"results: {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
