"""Process faults: the parent of a run killed the way the world does (`kill -9 PID`, SIGHUP from a closed terminal;
`kill -9` of its process group: tests/test_faults.py) ends torchrun and every rank with it; SIGTERM stops a run
like Ctrl-C (checkpoint of the last whole step, one line, exit 143) on every engine; a rank's user error is one
line and exit 2. Outcomes go to the fault table of tests/test_faults.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefopt import proctree, rundir
from prefopt.checkpoint import checkpoint_candidates
from tests.test_faults import (REPO, TINY, assert_nothing_survives, assert_same_metrics, prefopt, record, run_processes,
                               train_rows)

STEPS = 40  # 40 short steps: a signal sent at step 2 or 3 lands while the loop runs
TWO_RANKS = [*TINY, "hardware=cpu_2proc", f"trainer.max_steps={STEPS}", "trainer.save_every=2", "trainer.eval_every=20",
             "dynamics.every_n_steps=20", "logger.wandb.mode=disabled"]
ONE_PROCESS = [*TINY, f"trainer.max_steps={STEPS}", "trainer.eval_every=20", "dynamics.every_n_steps=20", "logger.wandb.mode=disabled"]


def start(run_dir: Path, args: list[str], log: Path) -> subprocess.Popen:
    """`prefopt train` in a session of its own (its pid is its process group's), stderr to a file."""
    command = [sys.executable, "-m", "prefopt.cli", "train", *args, f"hydra.run.dir={run_dir}"]
    with open(log, "w") as stderr:
        return subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and any(row["step"] >= step for row in train_rows(run_dir)):
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended (exit {process.poll()}) or stalled before step {step}")


@pytest.fixture(scope="module")
def straight_two_ranks(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = prefopt(*TWO_RANKS, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


KILLS = [
    pytest.param("kill -9 PID", lambda pid: os.kill(pid, signal.SIGKILL), id="sigkill"),
    pytest.param("SIGHUP (terminal closed)", lambda pid: os.kill(pid, signal.SIGHUP), id="sighup"),
]  # kill -9 of its process group: tests/test_faults.py (cpu_2proc)


@pytest.mark.slow
@pytest.mark.parametrize("how, kill", KILLS)
def test_killing_the_parent_of_two_ranks_ends_them_all_then_resume_is_exact(tmp_path, straight_two_ranks, how, kill):
    run_dir = tmp_path / "run"
    process = start(run_dir, TWO_RANKS, tmp_path / "stderr.txt")
    try:
        wait_for_step(process, run_dir, 3)
        kill(process.pid)
        process.wait(timeout=30)
        assert_nothing_survives(run_dir)
    finally:
        os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
    # the parent was killed mid-run: a summary means ranks ran on and finished the run (they may be gone by now)
    assert not (run_dir / "summary.json").exists(), "the ranks ran on after their parent was killed"
    resumed = prefopt(*TWO_RANKS, f"hydra.run.dir={run_dir}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_metrics(straight_two_ranks, run_dir)
    record(f"{how} of a 2-rank run's parent", "torchrun and both ranks gone within seconds; resume equals an uninterrupted run")


@pytest.mark.slow
def test_sigterm_stops_two_ranks_at_a_checkpoint_of_the_last_whole_step(tmp_path, straight_two_ranks):
    run_dir = tmp_path / "run"
    args = [*TWO_RANKS, "trainer.save_every=0"]  # no periodic checkpoints: the only one is SIGTERM's
    process = start(run_dir, args, tmp_path / "stderr.txt")
    wait_for_step(process, run_dir, 2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("prefopt:")]
    assert line.startswith("prefopt: terminated; resume with: prefopt train") and "trainer.resume=" in line
    [checkpoint] = checkpoint_candidates(run_dir)
    assert checkpoint.name == f"step-{train_rows(run_dir)[-1]['step']:06d}"  # the last whole step, written by both ranks
    assert not (run_dir / "error.txt").exists() and not list(run_dir.glob(".rank*.exit.json"))
    assert_nothing_survives(run_dir, within_s=2)
    resumed = prefopt(*args, f"hydra.run.dir={run_dir}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_metrics(straight_two_ranks, run_dir)
    record("SIGTERM to a 2-rank run's parent", "ranks checkpoint the same last whole step; exit 143, one line; resume equals")


@pytest.mark.slow
def test_sigterm_while_two_ranks_start_ends_them_quietly(tmp_path):
    run_dir = tmp_path / "run"
    process = start(run_dir, TWO_RANKS, tmp_path / "stderr.txt")
    deadline = time.time() + 120
    while not [line for line in run_processes(run_dir) if "prefopt.worker" in line and "torch.distributed.run" not in line]:
        assert time.time() < deadline and process.poll() is None, "the ranks never started"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # the ranks are importing: nothing to checkpoint yet
    assert process.wait(timeout=60) == 143
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"prefopt: terminated; run dir {run_dir} has no checkpoint to resume from"
    assert_nothing_survives(run_dir, within_s=2)
    record("SIGTERM while 2 ranks start up", "ended at once without torchrun's traceback; exit 143, one line (no checkpoint)")


@pytest.mark.slow
def test_a_user_error_on_two_ranks_is_one_line_and_exit_2(tmp_path, straight_two_ranks):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_two_ranks, run_dir)
    result = prefopt(*TWO_RANKS, "loss.beta=0.5", f"hydra.run.dir={run_dir}", "trainer.resume=true")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("prefopt:")]
    assert line.startswith("prefopt: error:") and "another config" in line and "loss.beta" in line
    assert not (run_dir / "error.txt").exists() and not list(run_dir.glob(".rank*.exit.json"))
    assert_nothing_survives(run_dir, within_s=5)
    record("resume with another config on 2 ranks", "exit 2, one line naming loss.beta (no tracebacks, no error.txt); ranks gone")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_sigterm_on_one_process_checkpoints_the_last_whole_step(tmp_path, engine):
    args = [*ONE_PROCESS, f"hardware.engine={engine}"]  # no periodic checkpoints
    run_dir = tmp_path / "run"
    process = start(run_dir, args, tmp_path / "stderr.txt")
    wait_for_step(process, run_dir, 2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("prefopt:")]
    assert line.startswith("prefopt: terminated; resume with: prefopt train")
    [checkpoint] = checkpoint_candidates(run_dir)
    assert checkpoint.name == f"step-{train_rows(run_dir)[-1]['step']:06d}"
    if engine == "torch":  # resume is exact (the deepspeed engine's resume is the same code path, tested above on 2 ranks)
        straight = tmp_path / "straight"
        assert prefopt(*args, f"hydra.run.dir={straight}").returncode == 0
        resumed = prefopt(*args, f"hydra.run.dir={run_dir}", "trainer.resume=true")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_same_metrics(straight, run_dir)
    record(f"SIGTERM mid-run (one process, {engine})", "checkpoint of the last whole step; exit 143, one line with the resume command")


def test_a_new_owner_waits_for_the_ranks_of_the_last_launch_then_refuses(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ranks.json").write_text(json.dumps({"launch": "x", "ranks": [{"rank": 1, "pid": 4242, "host": "h"}]}))
    ghost = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from prefopt import rundir; "
                              "rundir.hold_for_rank(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)", str(run_dir)],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert ghost.stdout.readline().strip() == "held"
        monkeypatch.setattr(rundir, "RANKS_GONE_WAIT_S", 0.5)
        with pytest.raises(rundir.RunDirBusyError, match="still has live ranks .*rank 1: pid 4242 on h"):
            rundir.acquire(run_dir)
        rundir.acquire(run_dir, wait_for_ranks=False)  # a job's own rank 0: its peers hold the ranks lock
        rundir.release(run_dir)
    finally:
        ghost.kill()
        ghost.wait()
    rundir.acquire(run_dir)  # the rank is gone: the dir is free at once
    rundir.release(run_dir)
    record("a rank of an ended launch still alive", "a new run waits for it, then refuses in one line naming it")


RANK = """import sys, time
time.sleep(float(sys.argv[2]))
from prefopt import proctree
proctree.follow_launcher()
time.sleep(1.0)
open(sys.argv[1], "w").write("ran on")
"""
TORCHRUN = """import os, subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
print(rank.pid, flush=True)
if sys.argv[4] == "wait":
    rank.wait()
else:
    time.sleep(float(sys.argv[4]))
"""


@pytest.mark.parametrize("case, rank_starts_s, torchrun_lives", [
    ("a rank whose torchrun lives", 0.0, "wait"),
    ("a rank whose torchrun dies after it started", 0.0, "0.8"),
    ("a rank that starts after its torchrun died", 0.5, "0"),
])
def test_a_rank_lives_only_as_long_as_its_launch(tmp_path, case, rank_starts_s, torchrun_lives):
    """This test process plays `prefopt train`, a child plays torchrun, its child a rank (proctree.follow_launcher)."""
    marker = tmp_path / "marker"
    env = {**os.environ, "PREFOPT_LAUNCHER_PID": str(os.getpid())}
    torchrun = subprocess.run([sys.executable, "-c", TORCHRUN, RANK, str(marker), str(rank_starts_s), torchrun_lives],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proctree.wait_gone([int(torchrun.stdout.split()[0])], 10.0) == []  # the rank
    assert marker.exists() == (torchrun_lives == "wait"), case
    record(case, "ran to its end" if marker.exists() else "ended with its launch (parent-death signal / launcher check)")
