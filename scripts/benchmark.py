"""Benchmark `prefopt train` configurations and print a table: wall time, training throughput, achieved
TFLOP/s (and MFU where the device's peak is known), peak resident memory of the run's process tree.

    .venv/bin/python scripts/benchmark.py                                  # the default job vs its variants
    .venv/bin/python scripts/benchmark.py --case "tiny=model=tiny_llama trainer.max_steps=20" \
        --case "tiny-ds2=model=tiny_llama hardware=cpu_2proc trainer.max_steps=20"
    .venv/bin/python scripts/benchmark.py --suite precision             # SmolLM2: fp32 vs bf16 mixed, same 20 steps
    .venv/bin/python scripts/benchmark.py --vs-trl --steps 12           # prefopt vs TRL 1.16 DPOTrainer (see below)
    .venv/bin/python scripts/benchmark.py --vs-sft --steps 6            # the DPO step vs an SFT step, time split
    .venv/bin/python scripts/benchmark.py --vs-trl --only trl-precompute,prefopt-packed-precompute   # the extra cases

Each case is NAME=OVERRIDES and runs in a fresh process (W&B disabled, run dirs under --out). Throughput
is the median over logged steps after the first (warm-up). Nothing is asserted: numbers go in notes/README.
--vs-trl runs TRL's DPOTrainer with its defaults and at its best here (precomputed reference log-probs, no
gradient checkpointing) against prefopt padded and default on the same pairs, and reports per-step and end-to-end
(reference pass included) tokens/s, their ratios to both TRL cases, MFU, and a per-step loss check (vs_trl_table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prefopt.core.runfiles import METRICS_FILE, SUMMARY_FILE  # noqa: E402
from prefopt.observe.tracking import read_jsonl  # noqa: E402

SUITES = {
    # the same 20 steps (same pairs, same order) in fp32 and in bf16 mixed precision
    "precision": ["fp32=trainer.max_steps=20 model.dtype=fp32", "bf16-mixed=trainer.max_steps=20 model.dtype=bf16"],
}
# every --vs-trl case (--only picks among them) and the ones run without --only, in this order
VS_TRL_CASES = ("trl", "trl-best", "trl-precompute", "prefopt-padded", "prefopt-default", "prefopt-packed-precompute")
VS_TRL_DEFAULT = ("trl", "trl-best", "prefopt-padded", "prefopt-default")
DEFAULT_CASES = [
    "default=",  # the embedded main job: DPO on SmolLM2-135M, arith, CPU
    "default-bf16=model.dtype=bf16",
    "default-chunk64=trainer.logp_chunk_size=64",
    "gate_dpo=loss=gate_dpo",
    "precomputed-ref=reference.precompute=true",
]


def run_case(name: str, overrides: str, out_dir: Path) -> dict:
    run_dir = out_dir / name
    command = [
        sys.executable,
        "-m",
        "prefopt.cli",
        "train",
        *shlex.split(overrides),
        "logger.wandb.mode=disabled",
        f"hydra.run.dir={run_dir}",
    ]
    peak_file = out_dir / f"{name}.peak_kb"
    # a wrapper process per case, so the peak RSS is this case's (getrusage of children is a running max)
    wrapper = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
        "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
    )
    started = time.time()
    result = subprocess.run([sys.executable, "-c", wrapper, str(peak_file), *command], capture_output=True, text=True)
    wall = time.time() - started
    peak_kb = int(peak_file.read_text()) if peak_file.exists() else 0
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode
        return {"case": name, "status": f"failed ({reason})"}
    all_steps = [row for row in read_jsonl(run_dir / METRICS_FILE) if "train/tokens_per_s" in row]
    steps = all_steps[1:]
    median = lambda key: statistics.median(row[key] for row in steps) if steps and key in steps[0] else float("nan")  # noqa: E731
    return {
        "case": name,
        "status": "ok",
        "wall_s": wall,
        "tokens_per_s": median("train/tokens_per_s"),
        "tflops": median("train/tflops"),
        "mfu": median("train/mfu"),
        "peak_rss_gb": peak_kb / 2**20 if peak_kb else float("nan"),
        "loss_first": all_steps[0]["train/loss"],
        "loss_mid": all_steps[len(all_steps) // 2 - 1]["train/loss"],
        "loss_last": all_steps[-1]["train/loss"],
        "eval_loss": json.loads((run_dir / SUMMARY_FILE).read_text()).get("eval/loss", float("nan")),
    }


# ---------------------------------------------------------------------------------------------------------------
# --vs-trl: prefopt vs TRL 1.16's DPOTrainer (issue 11), same pairs / batches / order / model / precision
#
# One invocation, cases run one after another, each in a wrapper process (its own peak RSS); * = run by default
# (VS_TRL_DEFAULT), the others only when --only names them:
# * trl                        TRL DPOTrainer, defaults (beta 0.1, sigmoid, reference model forward every step, and
#                              gradient checkpointing: TRL 1.x's DPOConfig defaults it to True)
# * trl-best                   TRL, its best here: precompute_ref_log_probs=True and gradient_checkpointing=False
#   trl-precompute             TRL with precompute_ref_log_probs=True (gradient checkpointing left on, the default)
# * prefopt-padded             prefopt trainer.batching=padded, reference forward every step
# * prefopt-default            prefopt as the default config is (batching / reference.precompute not overridden)
#   prefopt-packed-precompute  prefopt trainer.batching=packed reference.precompute=true (one-off pass timed)
# The table (vs_trl_table), per case: real tokens/s over steps 2..N (step 1 is warm-up) and its ratio to TRL's
# default and to trl-best; median s/step; the one-off reference pass (TRL's precompute inside DPOTrainer.__init__,
# prefopt's reference pass before step 1); end-to-end tokens/s = real tokens of all N steps / (all N step seconds +
# the one-off reference pass) and its ratios to the same two TRL cases; peak RSS; useful-work MFU against a dense
# fp32 matmul peak measured in the same run; CPU seconds per step. Under it: prefopt-default's per-step losses
# against prefopt-padded's (max abs difference over all N steps, accepted at <= LOSS_TOLERANCE).
# The pairs: scripts/make_hh_like_pairs.py (real English text, offline, seeded), 4 x steps training pairs plus
# EVAL_PAIRS held out (prefopt evaluates at step 0 and at the end, outside the timed steps). prefopt draws its
# batches with its own PairSampler; TRL gets the same pairs written in that order and reads them sequentially,
# so step k of every case trains on the same 4 pairs. Plain text on both sides: no chat template
# (prefopt dataset.chat_template=never, TRL's non-conversational format), eos_token after each response.
# ---------------------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
BENCH_VENV = REPO / ".venv-bench"
BENCH_INSTALL = (["torch==2.13.0"], ["trl==1.16.0", "datasets", "accelerate"])  # torch first: the CPU build, not CUDA
BENCH_MARKER = ".prefopt-bench-ready"
PAIRS_PER_STEP = 4
EVAL_PAIRS = 2
VS_TRL_LABELS = {
    "trl": "TRL 1.16 DPOTrainer (defaults)",
    "trl-best": "TRL, its best here (precompute_ref_log_probs=True, gradient_checkpointing=False)",
    "trl-precompute": "TRL precompute_ref_log_probs=True",
    "prefopt-padded": "prefopt batching=padded",
    "prefopt-default": "prefopt default",
    "prefopt-packed-precompute": "prefopt packed + reference.precompute",
    "trl-repeat": "TRL 1.16 DPOTrainer (defaults), again at the end",
}
TRL_FLAGS = {"trl-best": ["--precompute", "--no-gradient-checkpointing"], "trl-precompute": ["--precompute"]}
LOSS_TOLERANCE = 1e-4  # prefopt default vs padded: the same model, pairs and steps; only the batch layout differs
PROGRESS = re.compile(r"\[bench_trl\]|step \d+/\d+ \||reference cache|Traceback|Error")
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def ensure_bench_venv() -> Path:
    """.venv-bench with TRL, made once (the project's own venv never gets TRL); later calls only check it."""
    python = BENCH_VENV / "bin" / "python"
    marker = BENCH_VENV / BENCH_MARKER
    wanted = json.dumps(BENCH_INSTALL)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(
        f"setting up {BENCH_VENV} ({' then '.join(' '.join(group) for group in BENCH_INSTALL)})",
        file=sys.stderr,
        flush=True,
    )
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    for group in BENCH_INSTALL:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *group], check=True)
    subprocess.run(
        [str(python), "-c", "import trl, torch; assert trl.__version__ == '1.16.0', trl.__version__"], check=True
    )
    marker.write_text(wanted)
    return python


def prefopt_overrides(pairs: Path, steps: int, seed: int) -> list[str]:
    eval_fraction = EVAL_PAIRS / (PAIRS_PER_STEP * steps + EVAL_PAIRS)
    return [
        "loss=dpo",
        "model=smollm2_135m",
        "model.dtype=fp32",
        "hardware=cpu",
        "dataset=local",
        f"dataset.path={pairs}",
        "dataset.format=strings",
        "dataset.chat_template=never",
        f"dataset.eval_fraction={eval_fraction:.6f}",
        "dataset.max_length=512",
        "dataset.max_prompt_length=256",  # above the longest pair: nothing truncated
        f"trainer.micro_batch_size={PAIRS_PER_STEP}",
        "trainer.grad_accum=1",
        f"trainer.max_steps={steps}",
        f"trainer.seed={seed}",
        "trainer.lr=1e-6",
        "trainer.warmup_steps=0",
        "trainer.lr_schedule=linear",  # TRL's defaults (no effect on speed)
        "dynamics.enabled=false",
        "trainer.greedy_eval_examples=0",
        "trainer.eval_every=0",
        "trainer.max_eval_batches=1",
        "trainer.save_final=false",
        "logger.wandb.mode=disabled",
    ]


def plan_batches(overrides: list[str], steps: int) -> dict:
    """Compose the prefopt config, tokenize the pairs with prefopt's pipeline and draw its batches with its
    PairSampler: which pairs each step trains on and their real token counts (prompt + chosen + rejected,
    end-of-sequence tokens included, each counted once)."""
    from hydra import compose, initialize_config_module

    from prefopt.data import build_preference_data
    from prefopt.data.sampler import PairSampler
    from prefopt.model.loading import converted_gguf_dir, load_tokenizer
    from prefopt.run.config import register_schema

    register_schema()
    with initialize_config_module(config_module="prefopt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    model_dir = converted_gguf_dir(cfg.model)  # converts the GGUF once if it is not cached yet
    tokenizer = load_tokenizer(cfg.model)
    data = build_preference_data(cfg.dataset, tokenizer, cfg.trainer.seed)
    if len(data.train) != PAIRS_PER_STEP * steps:
        raise SystemExit(
            f"expected {PAIRS_PER_STEP * steps} training pairs (one pass), prefopt has {len(data.train)}: {data.stats}"
        )
    sampler = PairSampler(len(data.train), cfg.trainer.seed)
    order = [index for _ in range(steps) for index in sampler.next_indices(PAIRS_PER_STEP)]
    assert sorted(order) == list(range(len(data.train))), "not one pass"
    pairs = [data.train[index] for index in order]
    pair_tokens = [len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids) for pair in pairs]
    return {
        "model_dir": model_dir,
        "pairs": pairs,
        "pair_tokens": pair_tokens,
        "stats": data.stats,
        "step_tokens": [sum(pair_tokens[i : i + PAIRS_PER_STEP]) for i in range(0, len(pair_tokens), PAIRS_PER_STEP)],
        "default_batching": cfg.trainer.batching,
        "default_precompute": str(cfg.reference.precompute).lower(),
    }


def smollm2_dir() -> Path:
    """The converted SmolLM2 directory (tokenizer + weights), converted from the GGUF here on a fresh machine."""
    from hydra import compose, initialize_config_module

    from prefopt.model.loading import converted_gguf_dir
    from prefopt.run.config import register_schema

    register_schema()
    with initialize_config_module(config_module="prefopt.conf", version_base="1.3"):
        return converted_gguf_dir(compose(config_name="config", overrides=["model=smollm2_135m"]).model)


def safetensors_parameters(model_dir: Path) -> int:
    """Parameters of the saved model (a tied head is stored once, and counted once)."""
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def matmul_peak_gflops(size: int = 2048, repeats: int = 8) -> float:
    """Dense fp32 matmul throughput, best of `repeats` (torch's default threads, as the cases use)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


STEP_LINE = re.compile(r"(?:\[bench_trl\] )?step (\d+)/\d+ (?:\||[\d.]+ s)")


def process_cpu_seconds(pid: int) -> Optional[float]:
    """user + system CPU seconds of a process, all its threads (/proc/PID/stat), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pid(parent: int) -> Optional[int]:
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        return int(children[0]) if children else None
    except OSError:
        return None


def run_logged(name: str, command: list[str], out_dir: Path) -> dict:
    """Run one case in a wrapper process that records its child's peak RSS; stream progress lines to stderr;
    sample the case process's CPU time whenever a step line appears (the wall clock is shared with other
    work on this machine, CPU seconds much less so)."""
    log_path, peak_file = out_dir / f"{name}.log", out_dir / f"{name}.peak_kb"
    wrapper = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
        "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    started = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(command)}", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", wrapper, str(peak_file), *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    shown, case_pid, cpu_at_step = 0, None, {}
    while True:
        done = process.poll() is not None
        case_pid = case_pid or child_pid(process.pid)
        text = log_path.read_text(errors="replace")
        complete = text[: text.rfind("\n") + 1].splitlines()
        for line in complete[shown:]:
            step = STEP_LINE.search(line)
            if step and case_pid and not done:
                cpu = process_cpu_seconds(case_pid)
                if cpu is not None:
                    cpu_at_step[int(step.group(1))] = cpu
            if PROGRESS.search(line):
                print(f"  [{name} +{time.time() - started:.0f}s] {line.strip()[:200]}", file=sys.stderr, flush=True)
        shown = len(complete)
        if done:
            break
        time.sleep(1)
    wall = time.time() - started
    print(
        f"[{time.strftime('%H:%M:%S')}] {name}: exit {process.returncode} after {wall:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return {
        "returncode": process.returncode,
        "wall_s": wall,
        "log": log_path,
        "cpu_at_step": cpu_at_step,
        "peak_rss_gb": int(peak_file.read_text()) / 2**20 if peak_file.exists() else float("nan"),
    }


def prefopt_result(name: str, run_dir: Path, cache_dir: Path, log_path: Path, plan: dict) -> dict:
    rows = sorted(
        (row for row in read_jsonl(run_dir / METRICS_FILE) if "train/tokens_per_s" in row),
        key=lambda row: row["step"],
    )
    # prefopt's own per-step timing (time.time() around data -> forward/backward -> optimizer step):
    # train/tokens_per_s = that step's real tokens / its seconds, so seconds = tokens / tokens_per_s
    step_s = [plan["step_tokens"][row["step"] - 1] / row["train/tokens_per_s"] for row in rows]
    result = {"step_s": step_s, "loss": [row["train/loss"] for row in rows], "ref_pass_s": None}
    log_text = log_path.read_text(errors="replace")
    if "reference cache hit" in log_text:
        result["ref_pass_s"] = float("nan")
        result["note"] = "reference cache hit: pass not timed"
    for line in log_text.splitlines():
        if "reference cache miss" in line and LOG_TIME.search(line):
            # from the log line before the pass to the cache file it writes when done
            began = datetime.datetime.strptime(LOG_TIME.search(line).group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            written = [path.stat().st_mtime for path in cache_dir.glob("*.pt")]
            result["ref_pass_s"] = max(written) - began if written else float("nan")
            result["ref_pass_pairs"] = int(re.search(r"for (\d+) pairs", line).group(1))
    return result


def trl_result(json_path: Path, plan: dict) -> dict:
    data = json.loads(json_path.read_text())
    mismatched = sum(a != b for a, b in zip(data["pair_tokens"], plan["pair_tokens"]))
    return {
        "step_s": data["step_s"],
        "loss": [entry["loss"] for entry in data["logs"]],
        "ref_pass_s": data["precompute_s"],
        "ref_pass_pairs": len(data["pair_tokens"]) if data["precompute"] else None,
        "gradient_checkpointing": data.get("gradient_checkpointing"),
        "versions": data["versions"],
        "cpu_at_step": {step + 1: cpu for step, cpu in enumerate(data["cpu_at_step_end"])},
        "token_mismatches": mismatched,
        "trl_tokens": sum(data["pair_tokens"]),
        "config": data["config"],
    }


def vs_trl_rates(results: dict, plan: dict, steps: int, num_params: int, peak: float) -> None:
    """Fill each finished row's rates in place (a row without all `steps` step times gets a failed `status`):
    tokens/s and s/step over steps 2..N, end-to-end tokens/s over all N steps plus the one-off reference pass,
    CPU seconds, useful-work MFU against `peak` GFLOP/s."""
    timed_tokens = sum(plan["step_tokens"][1:])
    for row in results.values():
        if row["returncode"] != 0 or len(row.get("step_s", [])) != steps:
            row.setdefault(
                "status", f"failed ({row['returncode']}, {len(row.get('step_s', []))} steps): see {row['log']}"
            )
            continue
        timed = row["step_s"][1:]  # step 1 is warm-up
        row["median_step_s"] = statistics.median(timed)
        row["tokens_per_s"] = timed_tokens / sum(timed)
        # end to end: every step, step 1 included, and the one-off reference pass where the case has one (none
        # where a reference model runs every step); a pass that was not timed leaves it undefined
        ref = row.get("ref_pass_s")
        ref_s = 0.0 if ref is None and row["reference_forward"] else ref
        if ref_s is not None and not math.isnan(ref_s):
            row["e2e_s"] = sum(row["step_s"]) + ref_s
            row["e2e_tokens_per_s"] = sum(plan["step_tokens"]) / row["e2e_s"]
        cpu = row.get("cpu_at_step", {})
        last = max((step for step in cpu if step >= 2), default=None)
        if 1 in cpu and last:  # CPU seconds of steps 2..last (prefopt: sampled when its step line appears)
            row["cpu_s_per_step"] = (cpu[last] - cpu[1]) / (last - 1)
            row["tokens_per_cpu_s"] = sum(plan["step_tokens"][1:last]) / (cpu[last] - cpu[1])
        flops_per_token = (6 + (2 if row["reference_forward"] else 0)) * num_params
        row["mfu"] = flops_per_token * row["tokens_per_s"] / (peak * 1e9)


def vs_trl_loss_check(results: dict, steps: int) -> dict:
    """prefopt-default's per-step training losses against prefopt-padded's: the max abs difference over all steps
    (the same model, pairs and order; only the batch layout and the reference's source differ)."""
    check = {"cases": ["prefopt-default", "prefopt-padded"], "tolerance": LOSS_TOLERANCE}
    losses = [results.get(name, {}).get("loss") or [] for name in check["cases"]]
    if any(len(loss) != steps for loss in losses):
        missing = [f"{name} {len(loss)}/{steps} losses" for name, loss in zip(check["cases"], losses)]
        return check | {"max_abs_diff": None, "ok": None, "reason": ", ".join(missing)}
    worst = max(abs(a - b) for a, b in zip(*losses))
    return check | {"steps": steps, "max_abs_diff": worst, "ok": worst <= LOSS_TOLERANCE}


def vs_trl_table(
    results: dict,
    plan: dict,
    steps: int,
    peaks: list[float],
    num_params: int,
    load: Optional[tuple[float, float]] = None,
) -> list[str]:
    """The --vs-trl report (markdown lines): the main table, how its columns are made, the step table, the checks.
    `results` maps case -> row (run_logged's fields + trl_result / prefopt_result's); rates are filled in place.
    `plan` needs step_tokens and pair_tokens; `peaks` the matmul GFLOP/s measured before and after the cases."""
    peak = max(peaks)
    vs_trl_rates(results, plan, steps, num_params, peak)
    timed_tokens = sum(plan["step_tokens"][1:])

    def ratio(row: dict, key: str, base_case: str) -> str:
        base = results.get(base_case, {}).get(key)
        return f"{row[key] / base:.2f}x" if base and key in row else "n/a"

    version = next(
        (
            results[name]["versions"]["trl"]
            for name in ("trl", "trl-best", "trl-precompute")
            if "versions" in results.get(name, {})
        ),
        "1.16.0",
    )
    lines = [
        f"prefopt vs TRL {version} DPO, SmolLM2-135M fp32 on the CPU, {PAIRS_PER_STEP} pairs per step, {steps} steps "
        f"(step 1 not timed), the same pairs in the same order in every case; real tokens per timed step: "
        f"{timed_tokens / (steps - 1):.0f} (prompt + chosen + rejected, eos included, no padding)",
        "",
        "| case | real tokens/s | s/step (median) | one-off reference pass s | tokens/s vs TRL default | "
        "tokens/s vs TRL best | end-to-end tokens/s | end-to-end vs TRL default | end-to-end vs TRL best | "
        "peak RSS GB | useful-work MFU | CPU s/step (mean) | tokens per CPU s vs TRL default |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results.values():
        if "tokens_per_s" not in row:
            lines.append(f"| {row['label']} | {row['status']} |{' |' * 7} {row['peak_rss_gb']:.2f} |{' |' * 3}")
            continue
        ref = row.get("ref_pass_s")
        if ref is None and row["reference_forward"]:
            ref_cell = "-"  # a reference model runs every step: no one-off pass
        elif ref is None or math.isnan(ref):
            ref_cell = "not timed"
        else:
            ref_cell = f"{ref:.1f} ({row.get('ref_pass_pairs')} pairs)"
        e2e_cell = f"{row['e2e_tokens_per_s']:.1f}" if "e2e_tokens_per_s" in row else "n/a (reference pass not timed)"
        cpu_cell = f"{row['cpu_s_per_step']:.1f}" if "cpu_s_per_step" in row else "n/a"
        lines.append(
            f"| {row['label']}{' (resumed)' if row.get('resumed') else ''} | {row['tokens_per_s']:.1f} | "
            f"{row['median_step_s']:.1f} | {ref_cell} | {ratio(row, 'tokens_per_s', 'trl')} | "
            f"{ratio(row, 'tokens_per_s', 'trl-best')} | {e2e_cell} | {ratio(row, 'e2e_tokens_per_s', 'trl')} | "
            f"{ratio(row, 'e2e_tokens_per_s', 'trl-best')} | {row['peak_rss_gb']:.2f} | {100 * row['mfu']:.1f}% | "
            f"{cpu_cell} | {ratio(row, 'tokens_per_cpu_s', 'trl')} |"
        )
    lines += [
        "",
        f"measured dense fp32 peak: {peak:.1f} GFLOP/s (torch.matmul 2048x2048 @ 2048x2048, best of 8; before the "
        f"cases {peaks[0]:.1f}, after {peaks[-1]:.1f}; all: {', '.join(f'{p:.1f}' for p in peaks)}); MFU = (6N, + 2N "
        f"with a reference forward per step) x real tokens/s / peak, N = {num_params:,} (useful work: TRL's "
        "gradient-checkpointing recomputation is not counted)",
        "tokens/s = real tokens of steps 2..N / their summed wall time; s/step = median of steps 2..N; end-to-end "
        f"tokens/s = real tokens of steps 1..N ({sum(plan['step_tokens'])}) / (wall time of steps 1..N + the one-off "
        "reference pass: TRL's precompute_ref_log_probs inside DPOTrainer.__init__, prefopt's pass before step 1; "
        "none where a reference model runs every step); vs TRL default = / the trl row, vs TRL best = / the trl-best "
        "row (precompute_ref_log_probs=True, gradient_checkpointing=False); peak RSS = "
        "getrusage(RUSAGE_CHILDREN).ru_maxrss of each case's own wrapper process; CPU s = user + system seconds of "
        "the case's process (all threads) over steps 2..N (TRL: time.process_time() at on_step_end; prefopt: "
        "/proc/PID/stat sampled within ~1 s of each step's log line)",
    ]
    if load:
        lines.append(
            f"load average before {load[0][0]:.2f}, after {load[1][0]:.2f} (2 shared cores: absolute numbers drift, "
            "compare within this table)"
        )
    lines += [
        "",
        "| case | started | loss step 1 | loss step N | step seconds (1..N) | wall s (whole process) |",
        "|---|---|---|---|---|---|",
    ]
    for row in results.values():
        if "loss" in row and row["loss"]:
            lines.append(
                f"| {row['label']} | {row.get('started', '?')} | {row['loss'][0]:.4f} | {row['loss'][-1]:.4f} | "
                f"{' '.join(f'{value:.1f}' for value in row['step_s'])} | {row['wall_s']:.0f} |"
            )
    checks = [
        f"{name}: TRL tokenized {row['trl_tokens']} tokens, prefopt {sum(plan['pair_tokens'])}; pairs whose count "
        f"differs: {row['token_mismatches']}"
        for name, row in results.items()
        if "token_mismatches" in row
    ]
    check = vs_trl_loss_check(results, steps)
    if check["ok"] is None:
        checks.append(f"loss check (prefopt default vs padded, per step): not available ({check['reason']})")
    else:
        checks.append(
            f"loss check: prefopt default vs prefopt padded, per-step training loss over all {steps} steps: max abs "
            f"difference {check['max_abs_diff']:.2e} (acceptance <= {LOSS_TOLERANCE:.0e}: "
            f"{'ok' if check['ok'] else 'FAILED'})"
        )
    return lines + ["", *checks]


def run_vs_trl(out_dir: Path, steps: int, seed: int, cases: list[str], resume: bool = False) -> None:
    began = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(cases) - set(VS_TRL_CASES) - {"trl-repeat"}
    if unknown:
        raise SystemExit(f"unknown --only case(s) {sorted(unknown)}; choose from {','.join(VS_TRL_CASES)}")
    if steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is warm-up and is not timed)")
    load_before = os.getloadavg()
    bench_python = ensure_bench_venv() if any(case.startswith("trl") for case in cases) else None
    pairs_path = out_dir / "pairs.jsonl"
    num_pairs = PAIRS_PER_STEP * steps + EVAL_PAIRS
    subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "make_hh_like_pairs.py"),
            "--out",
            str(pairs_path),
            "--num-pairs",
            str(num_pairs),
            "--seed",
            str(seed),
            "--tokenizer",
            str(smollm2_dir()),
        ],
        check=True,
        cwd=REPO,
    )
    overrides = prefopt_overrides(pairs_path, steps, seed)
    plan = plan_batches(overrides, steps)
    if plan["stats"].get("train/truncated") or plan["stats"].get("train/dropped_empty_response"):
        raise SystemExit(f"some pairs were truncated: {plan['stats']}")
    raw_rows = [json.loads(line) for line in pairs_path.read_text().splitlines() if line.strip()]
    trl_pairs = out_dir / "pairs_in_prefopt_order.jsonl"  # the training pairs, in the order prefopt draws them
    trl_pairs.write_text(
        "".join(json.dumps(raw_rows[pair.source_index], ensure_ascii=False) + "\n" for pair in plan["pairs"])
    )
    num_params = safetensors_parameters(plan["model_dir"])
    peaks_file = out_dir / "matmul_peaks.json"  # every measurement of this out dir (a resumed invocation adds its own)
    peaks = (json.loads(peaks_file.read_text()) if resume and peaks_file.exists() else []) + [matmul_peak_gflops()]
    peaks_file.write_text(json.dumps(peaks))
    print(
        f"pairs: {pairs_path} ({num_pairs}: {len(plan['pairs'])} train in one pass, {EVAL_PAIRS} held out); real "
        f"tokens per step {plan['step_tokens']}; model {plan['model_dir']} ({num_params:,} parameters); fp32 matmul "
        f"{peaks[0]:.1f} GFLOP/s",
        file=sys.stderr,
        flush=True,
    )

    default_label = (
        f"prefopt default (batching={plan['default_batching']}, reference.precompute={plan['default_precompute']})"
    )
    # prefopt.train.reference.precompute_enabled's rule: auto and true precompute, false keeps a reference model
    reference_forward = {
        "trl": True,
        "trl-repeat": True,
        "trl-best": False,
        "trl-precompute": False,
        "prefopt-padded": True,
        "prefopt-default": plan["default_precompute"] not in ("auto", "true"),
        "prefopt-packed-precompute": False,
    }
    extra = {
        "prefopt-padded": ["trainer.batching=padded", "reference.precompute=false"],
        "prefopt-default": [],
        "prefopt-packed-precompute": ["trainer.batching=packed", "reference.precompute=true"],
    }
    results = {}
    for name in cases:
        saved = out_dir / f"{name}.result.json"
        if resume and saved.exists():  # finished by an earlier, interrupted invocation on this out dir
            results[name] = json.loads(saved.read_text())
            results[name]["cpu_at_step"] = {
                int(step): cpu for step, cpu in results[name].get("cpu_at_step", {}).items()
            }
            results[name]["resumed"] = True
            print(f"{name}: kept from the earlier invocation ({saved})", file=sys.stderr, flush=True)
            continue
        for stale in (out_dir / name, out_dir / f"{name}-reference-cache"):  # left by an interrupted invocation
            if stale.exists():
                stale.rename(stale.with_name(f"{stale.name}.interrupted-{int(time.time())}"))
        if name.startswith("trl"):
            json_path = out_dir / f"{name}.json"
            command = [
                str(bench_python),
                str(REPO / "scripts" / "bench_trl.py"),
                "--model",
                str(plan["model_dir"]),
                "--pairs",
                str(trl_pairs),
                "--steps",
                str(steps),
                "--batch",
                str(PAIRS_PER_STEP),
                "--seed",
                str(seed),
                "--out",
                str(json_path),
            ]
            command += TRL_FLAGS.get(name, [])
        else:
            run_dir, cache_dir = (
                out_dir / name,
                out_dir / f"{name}-reference-cache",
            )  # a fresh cache: the pass is computed
            command = [
                sys.executable,
                "-m",
                "prefopt.cli",
                "train",
                *overrides,
                *extra[name],
                f"hydra.run.dir={run_dir}",
                f"reference.cache_dir={cache_dir}",
            ]
        run = run_logged(name, command, out_dir)
        row = {
            "case": name,
            "label": default_label if name == "prefopt-default" else VS_TRL_LABELS[name],
            **run,
            "reference_forward": reference_forward[name],
            "command": shlex.join(command),
        }
        if run["returncode"] == 0:
            try:
                row |= (
                    trl_result(json_path, plan)
                    if name.startswith("trl")
                    else prefopt_result(name, run_dir, cache_dir, run["log"], plan)
                )
            except Exception as error:  # a parse problem must not lose the other cases
                row["returncode"] = f"unreadable ({type(error).__name__}: {error})"
        row["started"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - run["wall_s"]))
        results[name] = row
        if row["returncode"] == 0:
            saved.write_text(json.dumps(row, default=str))
    peaks.append(matmul_peak_gflops())
    lines = vs_trl_table(results, plan, steps, peaks, num_params, load=(load_before, os.getloadavg()))
    lines.append(f"whole benchmark: {time.time() - began:.0f} s; run dirs and logs in {out_dir}")
    print("\n".join(lines))
    (out_dir / "vs_trl.md").write_text("\n".join(lines) + "\n")
    (out_dir / "vs_trl.json").write_text(
        json.dumps(
            {
                "peak_gflops": peaks,
                "num_params": num_params,
                "plan_stats": plan["stats"],
                "step_tokens": plan["step_tokens"],
                "loss_check": vs_trl_loss_check(results, steps),
                "cases": results,
            },
            default=str,
            indent=1,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="NAME=OVERRIDES (repeatable); default: the main-job variants")
    parser.add_argument("--suite", choices=sorted(SUITES), help="a named set of cases")
    parser.add_argument("--out", type=Path, default=None, help="where run dirs go (default: a temporary dir)")
    parser.add_argument(
        "--vs-trl", action="store_true", help="prefopt vs TRL's DPOTrainer on the same HH-like pairs (own venv)"
    )
    parser.add_argument(
        "--vs-sft",
        action="store_true",
        help="prefopt's DPO step against an SFT step on the same unique tokens, with the time split "
        "(scripts/bench_step.py, in process; --steps, --seed, --out pass through)",
    )
    parser.add_argument(
        "--steps", type=int, default=12, help="--vs-trl / --vs-sft: optimizer steps per case (4 pairs each)"
    )
    parser.add_argument("--seed", type=int, default=0, help="--vs-trl: seed of the pairs and of prefopt's data order")
    parser.add_argument(
        "--repeat-baseline",
        action="store_true",
        help="--vs-trl: run TRL's default case again at the end (how far the shared machine drifted)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="--vs-trl: keep the cases an interrupted invocation on --out finished"
    )
    parser.add_argument(
        "--only",
        default=None,
        help=f"--vs-trl: comma-separated cases out of {','.join(VS_TRL_CASES)} (default: {','.join(VS_TRL_DEFAULT)})",
    )
    args = parser.parse_args()
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="prefopt-bench-"))
    if args.vs_sft:  # one implementation of the in-process step comparison: bench_step.py's
        step_script = Path(__file__).resolve().parent / "bench_step.py"
        command = [sys.executable, str(step_script), "--steps", str(args.steps), "--pairs-seed", str(args.seed)]
        sys.exit(
            subprocess.run(
                [*command, "--out", str(out_dir), "--layouts", "padded,dense-1024,dense-auto,pieces"]
            ).returncode
        )
    if args.vs_trl:
        cases = args.only.split(",") if args.only else list(VS_TRL_DEFAULT)
        run_vs_trl(out_dir, args.steps, args.seed, cases + ["trl-repeat"] * args.repeat_baseline, args.resume)
        return
    rows = []
    for case in args.case or SUITES.get(args.suite) or DEFAULT_CASES:
        name, _, overrides = case.partition("=")
        rows.append(run_case(name, overrides, out_dir))
        print(f"finished {name}: {rows[-1]['status']}", file=sys.stderr)
    columns = (
        "wall_s",
        "tokens_per_s",
        "tflops",
        "mfu",
        "peak_rss_gb",
        "loss_first",
        "loss_mid",
        "loss_last",
        "eval_loss",
    )
    print(
        "| case | status | wall s | tokens/s | TFLOP/s | MFU | peak RSS GB* | train loss step 1 | mid | last | final "
        "eval loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [row.get(key, float("nan")) for key in columns]
        print(f"| {row['case']} | {row['status']} | " + " | ".join(f"{value:.4g}" for value in cells) + " |")
    print("\n* peak RSS of the case's largest process (per rank for torchrun ranks)")


if __name__ == "__main__":
    main()
