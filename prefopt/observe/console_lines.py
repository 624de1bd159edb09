"""The lines a training run prints (pure formatting, console.py prints them): the step line, each eval's
headline and the closing summary, which says where the run's outputs are and what to run next; and the pure
arithmetic of the training ETA they carry (console.py keeps the clock)."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Counter, Iterable, Mapping, Optional

from prefopt.core.runfiles import (
    CHECKPOINTS,
    DYNAMICS_FILE,
    DYNAMICS_PLOT,
    LATEST_FILE,
    MULTIRUN_FILE,
    TOKEN_VIEWS_DIR,
    TOKEN_VIEWS_FILE,
    WANDB_DIR,
    WANDB_ID_FILE,
)
from prefopt.observe.displacement import SUMMARY_STEP, SUMMARY_TEXT
from prefopt.observe.report import SUMMARY_COLUMNS

# The metric names the console reads (without their train/ or eval/ prefix), in one place: when the
# logged names change, this mapping is the only thing here to change.
METRIC_NAMES = {
    "loss": "loss",
    "accuracy": "rewards/accuracies",
    "margin": "rewards/margins",
    "chosen": "logps/chosen",
    "rejected": "logps/rejected",
}


def pass_kind(label: str) -> str:
    """'eval @ step 10' -> 'eval': the kind of pass a phase label names."""
    return label.split(" @ ", 1)[0]


def scheduled_passes(first_step: int, max_steps: int, every: Mapping[str, int], final: Iterable[str]) -> Counter:
    """How many passes of each kind a run makes after step `first_step`: kind -> every N steps (0: none between steps)
    before the last step, and the `final` kinds once after it."""
    planned: Counter = collections.Counter()
    for kind, interval in every.items():
        if interval:
            planned[kind] += (max_steps - 1) // interval - first_step // interval if first_step < max_steps else 0
    planned.update(final)
    return planned


def training_eta(
    steps_left: int,
    seconds_per_step: float,
    passes_left: Mapping[str, int],
    seconds_per_pass: Mapping[str, float],
    since_last: float,
) -> float:
    """Time left: the steps at their own rate (passes excluded), each pass still to come at the time its kind took
    (a kind not measured yet counts 0), counting down from the end of the last step or pass."""
    passes = sum(count * seconds_per_pass.get(kind, 0.0) for kind, count in passes_left.items())
    return max(0.0, steps_left * seconds_per_step + passes - since_last)


def format_duration(seconds: float) -> str:
    """0:07, 12:34, 1:02:03: the width of the number says its scale at a glance."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def metric(metrics: Mapping[str, Any], prefix: str, name: str) -> Optional[float]:
    value = metrics.get(f"{prefix}/{METRIC_NAMES[name]}")
    return float(value) if isinstance(value, (int, float)) else None


def number(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def eval_headline(step: int, metrics: Mapping[str, Any]) -> str:
    """One line per eval: what moved (accuracy, margin), where the log-probs went, and the loss."""
    text = (
        f"eval @ step {step} | acc {number(metric(metrics, 'eval', 'accuracy'), '.3f')} | margin "
        f"{number(metric(metrics, 'eval', 'margin'), '+.4f')} | logp chosen "
        f"{number(metric(metrics, 'eval', 'chosen'), '.2f')} rejected "
        f"{number(metric(metrics, 'eval', 'rejected'), '.2f')} | loss {number(metric(metrics, 'eval', 'loss'), '.4f')}"
    )
    if isinstance(metrics.get("eval/greedy_accuracy"), (int, float)):
        text += f" | greedy acc {metrics['eval/greedy_accuracy']:.3f}"
    return text


def flops_text(tflops: float) -> str:
    """'312.4 TFLOP/s' on a GPU, '0.0685 GFLOP/s' for a tiny model on a CPU (never '0.00 TFLOP/s')."""
    return f"{tflops:.2f} TFLOP/s" if tflops >= 0.1 else f"{tflops * 1e3:.3g} GFLOP/s"


def step_line(
    step: int, max_steps: int, metrics: Mapping[str, Any], seconds_per_step: float, eta: Optional[float]
) -> str:
    """The training line written every trainer.log_every steps (both modes)."""
    mfu = f" | MFU {100 * metrics['train/mfu']:.1f}%" if "train/mfu" in metrics else ""
    return (
        f"step {step}/{max_steps} | loss {number(metric(metrics, 'train', 'loss'), '.4f')} | margin "
        f"{number(metric(metrics, 'train', 'margin'), '.3f')} | acc "
        f"{number(metric(metrics, 'train', 'accuracy'), '.2f')} | lr {metrics.get('train/learning_rate', 0.0):.2e} | "
        f"{metrics.get('train/tokens_per_s', 0.0):.0f} tok/s | {flops_text(metrics.get('train/tflops', 0.0))}{mfu} | "
        f"{seconds_per_step:.2f} s/step | ETA {format_duration(eta) if eta is not None else '?'}"
    )


def squeeze_deltas(summary: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(column, value) of the probe deltas, named and chosen as `prefopt report` names its columns."""

    return [
        (column, float(summary[key]))
        for column, key in SUMMARY_COLUMNS.items()
        if key.startswith("delta/") and isinstance(summary.get(key), (int, float))
    ]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:

    latest = run_dir / CHECKPOINTS / LATEST_FILE
    if not latest.is_file():
        return None
    path = run_dir / CHECKPOINTS / latest.read_text().strip()
    return path if path.is_dir() else None


def wandb_line(run_dir: Path, mode: str) -> Optional[str]:
    """Where this run's W&B data is, and for an offline run the exact command that uploads it."""
    if mode == "disabled":
        return None
    segments = sorted((run_dir / WANDB_DIR).glob("offline-run-*"))
    if mode == "offline" and segments:
        target = (
            str(segments[0]) if len(segments) == 1 else str(run_dir / WANDB_DIR / "offline-run-*")
        )  # a resumed run: every segment
        return f"offline; upload with: wandb sync {target}"
    id_path = run_dir / WANDB_ID_FILE
    run_id = id_path.read_text().strip() if id_path.is_file() else "?"
    return f"{mode}, run id {run_id}"


def sweep_dir_of(run_dir: Path) -> Optional[Path]:
    """The multirun dir when this run is one job of a sweep (Hydra writes multirun.yaml there)."""
    return run_dir.parent if run_dir.name.isdigit() and (run_dir.parent / MULTIRUN_FILE).is_file() else None


def summary_lines(summary: Mapping[str, Any], run_dir: Path, wandb_mode: str) -> list[str]:
    """The closing summary: final eval, the squeeze deltas, where the outputs are, the next commands."""
    steps, seconds = summary.get("steps"), summary.get("train_seconds")
    timing = (
        f" in {format_duration(seconds)} ({seconds / steps:.2f} s/step incl. evals)"
        if steps and isinstance(seconds, (int, float))
        else ""
    )
    lines = [f"run finished: {steps} steps{timing}"]
    final = eval_headline(steps or 0, summary).removeprefix("eval @ ")
    before, after = summary.get("eval/greedy_accuracy_before"), summary.get("eval/greedy_accuracy_after")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        final = final.split(" | greedy acc")[0] + f" | greedy acc {before:.3f} -> {after:.3f}"
    lines.append(f"  final eval   {final}")
    deltas = squeeze_deltas(summary)
    if deltas:
        lines.append(
            "  squeeze      probe log-probs, first -> last probe: "
            + " | ".join(f"{name} {value:+.3f}" for name, value in deltas)
        )
    alarm = summary.get(SUMMARY_TEXT)
    if isinstance(alarm, str):
        lines.append(f"  alarm        step {summary.get(SUMMARY_STEP)}: {alarm}")
    lines.append(f"  run dir      {run_dir}")
    plot = run_dir / DYNAMICS_PLOT
    if plot.is_file():
        lines.append(f"  plot         {plot}")
    heatmaps = sorted((run_dir / TOKEN_VIEWS_DIR).glob("*.png"))
    if heatmaps:
        lines.append(f"  token views  {run_dir / TOKEN_VIEWS_DIR} ({len(heatmaps)} probe heatmaps; {TOKEN_VIEWS_FILE})")
    checkpoint = latest_checkpoint(run_dir)
    lines.append(
        "  checkpoint   "
        f"{checkpoint if checkpoint else 'none written (trainer.save_final=false, trainer.save_every=0)'}"
    )
    wandb = wandb_line(run_dir, wandb_mode)
    if wandb:
        lines.append(f"  W&B          {wandb}")
    commands = []
    if (run_dir / DYNAMICS_FILE).is_file():
        commands.append(f"prefopt plot {run_dir}")
    sweep_dir = sweep_dir_of(run_dir)
    if sweep_dir is not None:
        commands.append(f"prefopt report {sweep_dir}   (once the sweep is done)")
    if checkpoint is not None:
        commands.append(f"prefopt export {run_dir}   (the policy as a plain HF model)")
    for index, command in enumerate(commands):
        lines.append(f"  {'next' if index == 0 else '':<12} {command}")
    return lines
