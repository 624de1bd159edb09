"""Benchmark `prefopt train` configurations and print a table: wall time, training throughput, achieved
TFLOP/s (and MFU where the device's peak is known), peak resident memory of the run's process tree.

    .venv/bin/python scripts/benchmark.py                                  # the default job vs its variants
    .venv/bin/python scripts/benchmark.py --case "tiny=model=tiny_llama trainer.max_steps=20" \
        --case "tiny-ds2=model=tiny_llama hardware=cpu_2proc trainer.max_steps=20"
    .venv/bin/python scripts/benchmark.py --suite precision             # SmolLM2: fp32 vs bf16 mixed, same 20 steps

Each case is NAME=OVERRIDES and runs in a fresh process (W&B disabled, run dirs under --out). Throughput
is the median over logged steps after the first (warm-up). Nothing is asserted: numbers go in notes/README.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prefopt.tracking import read_jsonl  # noqa: E402

SUITES = {
    # the same 20 steps (same pairs, same order) in fp32 and in bf16 mixed precision
    "precision": ["fp32=trainer.max_steps=20 model.dtype=fp32", "bf16-mixed=trainer.max_steps=20 model.dtype=bf16"],
}
DEFAULT_CASES = [
    "default=",  # the embedded main job: DPO on SmolLM2-135M, arith, CPU
    "default-bf16=model.dtype=bf16",
    "default-chunk64=trainer.logp_chunk_size=64",
    "gate_dpo=loss=gate_dpo",
    "precomputed-ref=reference.precompute=true",
]


def run_case(name: str, overrides: str, out_dir: Path) -> dict:
    run_dir = out_dir / name
    command = [sys.executable, "-m", "prefopt.cli", "train", *shlex.split(overrides), "logger.wandb.mode=disabled",
               f"hydra.run.dir={run_dir}"]
    peak_file = out_dir / f"{name}.peak_kb"
    # a wrapper process per case, so the peak RSS is this case's (getrusage of children is a running max)
    wrapper = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
               "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)")
    started = time.time()
    result = subprocess.run([sys.executable, "-c", wrapper, str(peak_file), *command], capture_output=True, text=True)
    wall = time.time() - started
    peak_kb = int(peak_file.read_text()) if peak_file.exists() else 0
    if result.returncode != 0:
        return {"case": name, "status": f"failed ({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode})"}
    all_steps = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "train/tokens_per_s" in row]
    steps = all_steps[1:]
    median = lambda key: statistics.median(row[key] for row in steps) if steps and key in steps[0] else float("nan")  # noqa: E731
    return {
        "case": name, "status": "ok", "wall_s": wall, "tokens_per_s": median("train/tokens_per_s"),
        "tflops": median("train/tflops"), "mfu": median("train/mfu"),
        "peak_rss_gb": peak_kb / 2**20 if peak_kb else float("nan"),
        "loss_first": all_steps[0]["train/loss"], "loss_mid": all_steps[len(all_steps) // 2 - 1]["train/loss"],
        "loss_last": all_steps[-1]["train/loss"],
        "eval_loss": json.loads((run_dir / "summary.json").read_text()).get("eval/loss", float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="NAME=OVERRIDES (repeatable); default: the main-job variants")
    parser.add_argument("--suite", choices=sorted(SUITES), help="a named set of cases")
    parser.add_argument("--out", type=Path, default=None, help="where run dirs go (default: a temporary dir)")
    args = parser.parse_args()
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="prefopt-bench-"))
    rows = []
    for case in args.case or SUITES.get(args.suite) or DEFAULT_CASES:
        name, _, overrides = case.partition("=")
        rows.append(run_case(name, overrides, out_dir))
        print(f"finished {name}: {rows[-1]['status']}", file=sys.stderr)
    columns = ("wall_s", "tokens_per_s", "tflops", "mfu", "peak_rss_gb", "loss_first", "loss_mid", "loss_last", "eval_loss")
    print("| case | status | wall s | tokens/s | TFLOP/s | MFU | peak RSS GB* | train loss step 1 | mid | last | final eval loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [row.get(key, float("nan")) for key in columns]
        print(f"| {row['case']} | {row['status']} | " + " | ".join(f"{value:.4g}" for value in cells) + " |")
    print("\n* peak RSS of the case's largest process (per rank for torchrun ranks)")


if __name__ == "__main__":
    main()
