"""Fault injection: kills at random steps (both engines, 2 ranks), damaged and planted checkpoints, torn
metrics, concurrent and reused run dirs, NaN losses, a poisoned reference cache. Each case records its
outcome; the table is printed at the end of the test session (tests/conftest.py)."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prefopt.core import proctree
from prefopt.observe.tracking import read_jsonl
from prefopt.train.checkpoint import write_manifest
from tests.helpers import run_train, wandb_history_segments

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model=tiny_llama",
    "trainer.eval_batch_size=4",
    "trainer.lr=1e-3",
    "dataset.arith.num_train=32",
    "dataset.arith.num_eval=4",
    "trainer.greedy_eval_examples=0",
    "dynamics.num_probes=2",
    "dynamics.every_n_steps=4",
    "trainer.warmup_steps=0",
    "trainer.micro_batch_size=2",
    "trainer.eval_every=4",
    "hardware=cpu",
]
FAULT_OUTCOMES: list[tuple[str, str]] = []  # (case, outcome), printed by conftest's terminal summary


def record(case: str, outcome: str) -> None:
    FAULT_OUTCOMES.append((case, outcome))


def prefopt(*args: str, wait: bool = True, timeout: float = 300):
    command = [sys.executable, "-m", "prefopt.cli", "train", *args]
    if wait:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return subprocess.Popen(
        command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def segments(run_dir: Path) -> list[list[dict]]:
    """The W&B history of a run killed once and resumed: its two segments."""
    found = wandb_history_segments(run_dir)
    assert len(found) == 2, f"{len(found)} W&B segments in {run_dir}"
    return found


def resumed_step(output: str) -> int:
    """The step a resume started from, as the run's log says ("resumed from CHECKPOINT at step N")."""
    steps = {int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", output)}  # one line per rank
    assert len(steps) == 1, steps
    return steps.pop()


def train_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row]


def assert_same_metrics(first: Path, second: Path) -> None:
    ignore = {"train/tokens_per_s", "train/tflops", "train/mfu"}
    rows_a, rows_b = read_jsonl(first / "metrics.jsonl"), read_jsonl(second / "metrics.jsonl")
    assert [row["step"] for row in rows_a] == [row["step"] for row in rows_b]
    for row_a, row_b in zip(rows_a, rows_b):
        for key in row_a.keys() - ignore:
            if isinstance(row_a[key], float):
                assert row_b[key] == pytest.approx(row_a[key], rel=1e-5, abs=1e-6), (row_a["step"], key)
    assert json.loads((first / "summary.json").read_text())["eval/loss"] == pytest.approx(
        json.loads((second / "summary.json").read_text())["eval/loss"], rel=1e-5
    )


def run_processes(run_dir: Path) -> list[str]:
    """'pid: command line' of every live process (not a zombie) whose command line names run_dir (its parent,
    torchrun, its ranks)."""
    return [
        f"{pid}: {proctree.cmdline(pid)[:200]}"
        for pid in proctree.processes()
        if pid != os.getpid() and str(run_dir) in proctree.cmdline(pid) and proctree.running(pid)
    ]


def assert_nothing_survives(run_dir: Path, within_s: float = 10.0) -> None:
    deadline = time.time() + within_s
    while run_processes(run_dir) and time.time() < deadline:
        time.sleep(0.1)
    assert run_processes(run_dir) == [], "processes of the run survived its parent"


def kill_at_step(run_dir: Path, args: list[str], step: int) -> None:
    """kill -9 of the run's process group (the parent's: torchrun and its ranks have sessions of their own), then
    nothing of the run may survive: a rank that ran on would finish the run and hide the kill."""
    process = prefopt(*args, f"hydra.run.dir={run_dir}", wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if any(row["step"] >= step for row in train_rows(run_dir)) if (run_dir / "metrics.jsonl").exists() else False:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert_nothing_survives(run_dir)
    assert not (run_dir / "summary.json").exists(), (
        "the ranks ran on after their parent was killed and finished the run"
    )


KILL_CASES = [
    pytest.param("torch", [], id="torch"),
    pytest.param("deepspeed", ["hardware.engine=deepspeed"], id="deepspeed", marks=pytest.mark.slow),
    pytest.param("cpu_2proc", ["hardware=cpu_2proc"], id="cpu_2proc", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, extra", KILL_CASES)
def test_kill_9_at_a_random_step_then_resume_equals_an_uninterrupted_run(tmp_path, name, extra):
    args = [*TINY, *extra, "trainer.max_steps=10", "trainer.save_every=2", "logger.wandb.mode=offline"]
    straight = tmp_path / "straight"
    assert prefopt(*args, f"hydra.run.dir={straight}").returncode == 0
    killed = tmp_path / "killed"
    kill_step = random.Random(name).randint(3, 8)
    kill_at_step(killed, args, kill_step)
    resumed = prefopt(*args, f"hydra.run.dir={killed}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_metrics(straight, killed)
    # W&B: the killed segment kept what it flushed, the resumed one replayed the rest up to its checkpoint and logged
    # every step after it. A step the killed segment flushed past that checkpoint (the kill races W&B's writer) is
    # then logged again by the resumed segment, with the value the run's files hold; nothing is missing.
    killed_segment, resumed_segment = ([row for row in rows if "train/loss" in row] for rows in segments(killed))
    logs = "".join(path.read_text() for path in killed.glob("*.log"))  # inline runs log here; torchrun ranks: stderr
    checkpoint_step = resumed_step(logs + resumed.stderr)
    assert sorted({row["step"] for row in killed_segment + resumed_segment}) == list(range(1, 11))
    assert [row["step"] for row in resumed_segment if row["step"] > checkpoint_step] == list(
        range(checkpoint_step + 1, 11)
    )
    repeated = [row["step"] for row in killed_segment if row["step"] in {r["step"] for r in resumed_segment}]
    assert all(step > checkpoint_step for step in repeated), (repeated, checkpoint_step)
    final = {row["step"]: row["train/loss"] for row in killed_segment + resumed_segment}  # the later segment wins
    assert final == pytest.approx({row["step"]: row["train/loss"] for row in train_rows(killed)}, rel=1e-6)
    record(
        f"kill -9 of the process group at step {kill_step} ({name}), resume",
        "nothing of the run survives; metrics, summary and W&B history equal an uninterrupted run",
    )


def test_a_partial_checkpoint_from_a_kill_mid_save_is_ignored(tmp_path):
    run_dir = run_train(
        tmp_path / "run",
        *TINY,
        "trainer.max_steps=4",
        "trainer.save_every=2",
        "trainer.stop_after=2",
        "logger.wandb.mode=disabled",
    )
    partial = run_dir / "checkpoints" / ".step-000004.partial"
    partial.mkdir()
    (partial / "trainer_state.pt").write_bytes(b"half")  # what a kill during the write leaves
    run_train(
        run_dir,
        *TINY,
        "trainer.max_steps=4",
        "trainer.save_every=2",
        "trainer.resume=true",
        "logger.wandb.mode=disabled",
    )
    assert [row["step"] for row in train_rows(run_dir)] == [1, 2, 3, 4]
    assert not partial.exists() and (run_dir / "checkpoints" / "step-000004" / "manifest.json").is_file()
    record("kill during a checkpoint write (partial staging dir)", "ignored on resume, replaced by the next save")


def two_checkpoint_run(tmp_path) -> tuple[Path, Path]:
    args = [*TINY, "trainer.max_steps=6", "trainer.save_every=2", "logger.wandb.mode=disabled"]
    straight = run_train(tmp_path / "straight", *args)
    stopped = run_train(tmp_path / "stopped", *args, "trainer.stop_after=4")
    return straight, stopped


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, capfd):
    straight, stopped = two_checkpoint_run(tmp_path)
    weights = stopped / "checkpoints" / "step-000004" / "policy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "corrupt":
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        weights.write_bytes(bytes(data[: len(data) // 3]))
    run_train(
        stopped,
        *TINY,
        "trainer.max_steps=6",
        "trainer.save_every=2",
        "logger.wandb.mode=disabled",
        "trainer.resume=true",
    )
    output = capfd.readouterr().out
    assert "step-000004 is not usable" in output and ("checksum" in output or "truncated" in output)
    assert_same_metrics(straight, stopped)
    record(f"{damage} newest checkpoint", "warning names it; resumed from the previous one; metrics equal")


def test_no_valid_checkpoint_is_a_clear_error(tmp_path):
    _, stopped = two_checkpoint_run(tmp_path)
    for checkpoint in (stopped / "checkpoints").glob("step-*"):
        (checkpoint / "manifest.json").unlink()
    result = prefopt(
        *TINY, "trainer.max_steps=6", "logger.wandb.mode=disabled", f"hydra.run.dir={stopped}", "trainer.resume=true"
    )
    assert result.returncode == 2 and "no valid checkpoint" in result.stderr and "Traceback" not in result.stderr
    record("every checkpoint invalid", "exit 2: 'no valid checkpoint' listing each")


def test_a_torn_last_metrics_line_is_trimmed_on_resume(tmp_path):
    straight, stopped = two_checkpoint_run(tmp_path)
    with open(stopped / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "train/lo')  # a power cut mid-write
    run_train(
        stopped,
        *TINY,
        "trainer.max_steps=6",
        "trainer.save_every=2",
        "logger.wandb.mode=disabled",
        "trainer.resume=true",
    )
    assert_same_metrics(straight, stopped)
    record("torn last line of metrics.jsonl", "dropped with a warning; resume continues")


class Payload:
    """Unpickling this creates a file: the proof that a checkpoint ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    _, stopped = two_checkpoint_run(tmp_path)
    checkpoint = stopped / "checkpoints" / "step-000004"
    marker = tmp_path / "code-ran"
    with open(checkpoint / "trainer_state.pt", "wb") as handle:
        pickle.dump({"step": Payload(str(marker))}, handle)
    write_manifest(checkpoint)  # the attacker fixes the manifest too: only safe loading stands in the way
    result = prefopt(
        *TINY,
        "trainer.max_steps=6",
        "logger.wandb.mode=disabled",
        f"hydra.run.dir={stopped}",
        f"trainer.resume={checkpoint}",
    )
    assert result.returncode != 0 and "refusing to load" in result.stderr
    assert not marker.exists()
    record("planted pickle payload (manifest rewritten)", "refused by weights_only loading; the payload never ran")


def test_two_runs_in_one_dir_the_second_fails_at_once(tmp_path):
    run_dir = tmp_path / "run"
    first = prefopt(
        *TINY, "trainer.max_steps=400", "logger.wandb.mode=disabled", f"hydra.run.dir={run_dir}", wait=False
    )
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        started = time.time()
        second = prefopt(
            *TINY,
            "trainer.max_steps=4",
            "logger.wandb.mode=disabled",
            f"hydra.run.dir={run_dir}",
            "trainer.resume=true",
        )
        assert (
            second.returncode == 2
            and "in use by another prefopt run" in second.stderr
            and f"pid {first.pid}" in second.stderr
        )
        assert time.time() - started < 60
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the holder died: its lock went with it, so the next run takes the dir at once (no stale lock). It was killed
    # before its first checkpoint, so resuming it is refused (after the lock is taken) with what to do instead
    third = prefopt(
        *TINY, "trainer.max_steps=2", "logger.wandb.mode=disabled", f"hydra.run.dir={run_dir}", "trainer.resume=true"
    )
    assert third.returncode == 2 and "in use" not in third.stderr, third.stderr[-2000:]
    assert "no checkpoint to continue (the run there stopped before its first checkpoint" in third.stderr
    record(
        "two concurrent runs in one dir",
        "the second exits 2 at once naming the holder's pid; a dead holder's lock is free",
    )


def test_a_fresh_run_in_a_dir_that_holds_a_run_is_refused_and_deletes_nothing(tmp_path):
    run_dir = run_train(tmp_path / "run", *TINY, "trainer.max_steps=2", "logger.wandb.mode=disabled")
    before = sorted(
        str(path.relative_to(run_dir))
        for path in run_dir.rglob("*")
        if ".hydra" not in path.parts and path.name != "cli.log"
    )
    result = prefopt(*TINY, "trainer.max_steps=3", "logger.wandb.mode=disabled", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and "already holds a run" in result.stderr and "trainer.resume=true" in result.stderr
    after = sorted(
        str(path.relative_to(run_dir))
        for path in run_dir.rglob("*")
        if ".hydra" not in path.parts and path.name != "cli.log"
    )
    assert after == before
    record("fresh run in a reused dir", "exit 2: says how to resume or start fresh; nothing deleted")


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    _, stopped = two_checkpoint_run(tmp_path)
    result = prefopt(
        *TINY,
        "trainer.max_steps=6",
        "loss.beta=0.5",
        "logger.wandb.mode=disabled",
        f"hydra.run.dir={stopped}",
        "trainer.resume=true",
    )
    assert result.returncode == 2 and "another config" in result.stderr and "loss.beta" in result.stderr
    record("resume with another config", "exit 2 naming the differing keys (loss.beta)")


def nan_loss_at(monkeypatch, steps: set[int]):
    """Make the loss NaN at the given (1-based) training steps: a loss hook, as a fault would."""
    import prefopt.train.step as step_module

    original = step_module.preference_loss

    def poisoned(*args, progress, **kwargs):
        out = original(*args, progress=progress, **kwargs)
        if out.loss.requires_grad and round(progress * 8) + 1 in steps:
            out.loss = out.loss * float("nan")
            out.losses = out.losses * float("nan")
        return out

    monkeypatch.setattr(step_module, "preference_loss", poisoned)


def test_a_nan_step_is_skipped_logged_and_the_run_goes_on(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {3})
    run_dir = run_train(tmp_path / "run", *TINY, "trainer.max_steps=8", "logger.wandb.mode=disabled")
    rows = train_rows(run_dir)
    third = next(row for row in rows if row["step"] == 3)
    assert third["train/loss"] is None and "train/loss" in third["nonfinite"] and third["train/skipped_steps"] == 1
    assert rows[-1]["train/skipped_steps"] == 1 and math.isfinite(rows[-1]["train/loss"])
    text = (run_dir / "metrics.jsonl").read_text() + (run_dir / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    from safetensors.torch import load_file

    exported = load_file(run_dir / "checkpoints" / "step-000008" / "policy" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in exported.values())
    record(
        "NaN loss at step 3", "step skipped (not applied), logged as null + flag, train/skipped_steps=1, run completes"
    )


def test_consecutive_nan_steps_stop_the_run_and_keep_the_last_checkpoint(tmp_path, monkeypatch):
    from prefopt.core.errors import NonFiniteTrainingError

    nan_loss_at(monkeypatch, {5, 6, 7, 8})
    with pytest.raises((NonFiniteTrainingError, SystemExit)):
        run_train(
            tmp_path / "run",
            *TINY,
            "trainer.max_steps=8",
            "trainer.save_every=2",
            "trainer.max_skipped_steps=3",
            "logger.wandb.mode=disabled",
        )
    run_dir = tmp_path / "run"
    assert "consecutive" in (run_dir / "error.txt").read_text()
    from safetensors.torch import load_file

    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert newest.name == "step-000006"  # steps 5 and 6 were skipped: its weights are step 4's, finite
    assert all(torch.isfinite(tensor).all() for tensor in load_file(newest / "policy" / "model.safetensors").values())
    record("NaN at steps 5-8 (max_skipped_steps=3)", "stops at step 7 with a clear error; newest checkpoint finite")


def test_a_poisoned_reference_cache_is_detected_and_rebuilt(tmp_path, capfd):
    args = [
        *TINY,
        "trainer.max_steps=1",
        "logger.wandb.mode=disabled",
        "reference.precompute=true",
        f"reference.cache_dir={tmp_path / 'cache'}",
        "trainer.save_final=false",
    ]
    run_train(tmp_path / "first", *args)
    [cache] = list((tmp_path / "cache").glob("*.pt"))
    from prefopt.train.reference import values_digest

    stored = torch.load(cache, weights_only=True)
    stored["values"] = stored["values"] + 3.0  # right key, wrong values, digest recomputed to match
    stored["digest"] = values_digest(stored["values"])
    torch.save(stored, cache)
    second = run_train(tmp_path / "second", *args)
    assert "does not match the model at step 0" in capfd.readouterr().out
    first_eval = next(row for row in read_jsonl(second / "metrics.jsonl") if "eval/loss" in row)
    assert first_eval["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    record("poisoned reference cache (key and digest valid)", "step-0 spot check fails; rebuilt; step-0 eval loss ln 2")


def test_ctrl_c_checkpoints_the_last_whole_step_and_resume_equals_an_uninterrupted_run(tmp_path):
    args = [*TINY, "trainer.max_steps=10", "logger.wandb.mode=disabled"]  # no periodic checkpoints at all
    straight = tmp_path / "straight"
    assert prefopt(*args, f"hydra.run.dir={straight}").returncode == 0
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "prefopt.cli", "train", *args, f"hydra.run.dir={interrupted}"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(row["step"] >= 4 for row in train_rows(interrupted)):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("prefopt:")]
    assert "resume with: prefopt train" in line
    assert list((interrupted / "checkpoints").glob("step-*"))
    resumed = prefopt(*args, f"hydra.run.dir={interrupted}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_metrics(straight, interrupted)
    record(
        "Ctrl-C mid-run (no periodic checkpoints)",
        "exit 130, one line with the resume command; checkpoint of the last whole step; resume equals",
    )
