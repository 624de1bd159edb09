"""Process faults: the parent of a run killed the way the world does (`kill -9 PID`, SIGHUP from a closed terminal;
`kill -9` of its process group: tests/test_faults.py) ends torchrun and every rank with it; SIGTERM stops a run
like Ctrl-C (checkpoint of the last whole step, one line, exit 143) on every engine; a rank's user error is one
line and exit 2; what a rank reports to its parent is read by that launch only. Outcomes go to the fault table of
tests/test_faults.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefopt.core import proctree, rundir
from prefopt.core.errors import ConfigError, DataError
from prefopt.core.runfiles import EXIT_REPORT
from prefopt.run import launch
from prefopt.train.checkpoint import checkpoint_candidates
from tests.test_faults import (
    REPO,
    TINY,
    assert_nothing_survives,
    assert_same_metrics,
    prefopt,
    record,
    run_processes,
    train_rows,
)

STEPS = 40  # 40 short steps: a signal sent at step 2 or 3 lands while the loop runs
TWO_RANKS = [
    *TINY,
    "hardware=cpu_2proc",
    f"trainer.max_steps={STEPS}",
    "trainer.save_every=2",
    "trainer.eval_every=20",
    "dynamics.every_n_steps=20",
    "logger.wandb.mode=disabled",
]
ONE_PROCESS = [
    *TINY,
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every=20",
    "dynamics.every_n_steps=20",
    "logger.wandb.mode=disabled",
]


@pytest.fixture
def start():
    """Starts `prefopt train` in a session of its own (its pid is its process group's), stderr to a file; at teardown
    the session is killed, so a failed or timed-out test leaves no run behind (torchrun and its ranks die with it)."""
    started: list[subprocess.Popen] = []

    def launch_run(run_dir: Path, args: list[str], log: Path) -> subprocess.Popen:
        command = [sys.executable, "-m", "prefopt.cli", "train", *args, f"hydra.run.dir={run_dir}"]
        with open(log, "w") as stderr:
            started.append(
                subprocess.Popen(
                    command,
                    cwd=REPO,
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    # as a terminal's run has it: a suite started under `nohup` would pass SIGHUP on ignored, and a
                    # run that ignores hangups (what nohup asks for) rightly runs on after SIGHUP
                    preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
                )
            )
        return started[-1]

    yield launch_run
    for process in started:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and any(row["step"] >= step for row in train_rows(run_dir)):
            return
        time.sleep(0.2)
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
def test_killing_the_parent_of_two_ranks_ends_them_all_then_resume_is_exact(
    tmp_path, start, straight_two_ranks, how, kill
):
    run_dir = tmp_path / "run"
    process = start(run_dir, TWO_RANKS, tmp_path / "stderr.txt")
    wait_for_step(process, run_dir, 3)
    kill(process.pid)
    process.wait(timeout=30)
    assert_nothing_survives(run_dir)
    # the parent was killed mid-run: a summary means ranks ran on and finished the run (they may be gone by now)
    assert not (run_dir / "summary.json").exists(), "the ranks ran on after their parent was killed"
    resumed = prefopt(*TWO_RANKS, f"hydra.run.dir={run_dir}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_metrics(straight_two_ranks, run_dir)
    record(
        f"{how} of a 2-rank run's parent",
        "torchrun and both ranks gone within seconds; resume equals an uninterrupted run",
    )


@pytest.mark.slow
def test_sigterm_stops_two_ranks_at_a_checkpoint_of_the_last_whole_step(tmp_path, start, straight_two_ranks):
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
    assert (
        checkpoint.name == f"step-{train_rows(run_dir)[-1]['step']:06d}"
    )  # the last whole step, written by both ranks
    assert not (run_dir / "error.txt").exists() and not list(run_dir.glob(".rank*.exit.json"))
    assert_nothing_survives(run_dir)
    resumed = prefopt(*args, f"hydra.run.dir={run_dir}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_metrics(straight_two_ranks, run_dir)
    record(
        "SIGTERM to a 2-rank run's parent",
        "ranks checkpoint the same last whole step; exit 143, one line; resume equals",
    )


@pytest.mark.slow
def test_sigterm_while_two_ranks_start_ends_them_quietly(tmp_path, start):
    run_dir = tmp_path / "run"
    process = start(run_dir, TWO_RANKS, tmp_path / "stderr.txt")
    deadline = time.time() + 120
    while not [
        line for line in run_processes(run_dir) if "prefopt.worker" in line and "torch.distributed.run" not in line
    ]:
        assert time.time() < deadline and process.poll() is None, "the ranks never started"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # the ranks are importing: nothing to checkpoint yet
    assert process.wait(timeout=60) == 143
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"prefopt: terminated; run dir {run_dir} has no checkpoint to resume from"
    assert_nothing_survives(run_dir)
    record(
        "SIGTERM while 2 ranks start up",
        "ended at once without torchrun's traceback; exit 143, one line (no checkpoint)",
    )


@pytest.mark.slow
def test_a_user_error_only_a_rank_sees_is_one_line_and_exit_2(tmp_path):
    """A bad data row: only the ranks read the data (the parent loads none), so the error reaches the parent as a
    rank's exit report, and the other rank, waiting in a collective, is ended with it."""
    bad = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(8)] + [
        {"prompt": "q", "chosen": "same", "rejected": "same"}
    ]
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_dir = tmp_path / "run"
    result = prefopt(*TWO_RANKS, "dataset=local", f"dataset.path={bad}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
    [line] = [
        line for line in result.stderr.splitlines() if line.startswith("prefopt:")
    ]  # the rank's one line, said once
    assert line.startswith("prefopt: error:") and "line 9" in line and "pairs.jsonl" in line
    assert not list(run_dir.glob("error*.txt")) and not list(run_dir.glob(".rank*.exit.json"))
    assert_nothing_survives(run_dir)
    record(
        "a bad data row on 2 ranks (only the ranks read it)",
        "exit 2, one line naming the row (no tracebacks, no error.txt); ranks gone",
    )


@pytest.mark.slow
def test_a_rank_stopped_alone_before_the_loop_stops_the_launch(tmp_path, start):
    """Ctrl-C to one rank while it starts up: it reports a stop and exits, its peer would wait for it in a collective
    for good; the parent ends the launch and says so in one line."""
    run_dir = tmp_path / "run"
    process = start(run_dir, TWO_RANKS, tmp_path / "stderr.txt")
    deadline = time.time() + 120
    while not (ranks := {rank["rank"]: rank["pid"] for rank in read_ranks(run_dir)}).get(1):
        assert time.time() < deadline and process.poll() is None, "rank 1 never started"
        time.sleep(0.2)
    assert not (run_dir / "metrics.jsonl").exists() or not train_rows(run_dir), "the loop started: make start-up longer"
    os.kill(ranks[1], signal.SIGINT)
    assert process.wait(timeout=60) == 130
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("prefopt:")]
    assert line.startswith("prefopt: interrupted")
    assert not list(run_dir.glob(".rank*.exit.json"))
    assert_nothing_survives(run_dir)
    record(
        "Ctrl-C to one of 2 ranks while it starts", "the parent ends the launch: exit 130, one line; nothing survives"
    )


def read_ranks(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "ranks.json").read_text())["ranks"]
    except (OSError, ValueError, KeyError):
        return []


def test_sigterm_stops_a_sweep_in_one_line(tmp_path):
    """`prefopt train -m`: SIGTERM during a job is a stop (exit 143, one line), not the default death."""
    job = (
        "import os, signal, sys, time\nimport prefopt.run.sweep\n"
        "prefopt.run.sweep.run_job = lambda *args, **kwargs: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(60))\n"
        "from prefopt.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            job,
            "train",
            "-m",
            "model=tiny_llama",
            "loss=dpo,ipo",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 143, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1] == "prefopt: terminated"
    record("SIGTERM to a sweep (train -m)", "exit 143, one line")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_sigterm_on_one_process_checkpoints_the_last_whole_step(tmp_path, start, engine):
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
    if (
        engine == "torch"
    ):  # resume is exact (the deepspeed engine's resume is the same code path, tested above on 2 ranks)
        straight = tmp_path / "straight"
        assert prefopt(*args, f"hydra.run.dir={straight}").returncode == 0
        resumed = prefopt(*args, f"hydra.run.dir={run_dir}", "trainer.resume=true")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_same_metrics(straight, run_dir)
    record(
        f"SIGTERM mid-run (one process, {engine})",
        "checkpoint of the last whole step; exit 143, one line with the resume command",
    )


def test_a_new_owner_waits_for_the_ranks_of_the_last_launch_then_refuses(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ranks.json").write_text(json.dumps({"launch": "x", "ranks": [{"rank": 1, "pid": 4242, "host": "h"}]}))
    ghost = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from prefopt.core import rundir; "
            "rundir.hold_for_rank(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)",
            str(run_dir),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
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
        ghost.stdout.close()
    rundir.acquire(run_dir)  # the rank is gone: the dir is free at once
    rundir.release(run_dir)
    record("a rank of an ended launch still alive", "a new run waits for it, then refuses in one line naming it")


RANK = """import sys, time
time.sleep(float(sys.argv[2]))
from prefopt.core import proctree
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


@pytest.mark.parametrize(
    "case, rank_starts_s, torchrun_lives",
    [
        ("a rank whose torchrun lives", 0.0, "wait"),
        ("a rank whose torchrun dies after it started", 0.0, "0.8"),
        ("a rank that starts after its torchrun died", 0.5, "0"),
    ],
)
def test_a_rank_lives_only_as_long_as_its_launch(tmp_path, case, rank_starts_s, torchrun_lives):
    """This test process plays `prefopt train`, a child plays torchrun, its child a rank (proctree.follow_launcher)."""
    marker = tmp_path / "marker"
    env = {**os.environ, "PREFOPT_LAUNCHER_PID": str(os.getpid())}
    torchrun = subprocess.run(
        [sys.executable, "-c", TORCHRUN, RANK, str(marker), str(rank_starts_s), torchrun_lives],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proctree.wait_gone([int(torchrun.stdout.split()[0])], 10.0) == []  # the rank
    assert marker.exists() == (torchrun_lives == "wait"), case
    record(
        case, "ran to its end" if marker.exists() else "ended with its launch (parent-death signal / launcher check)"
    )


def test_a_junk_launcher_pid_is_not_a_launch(monkeypatch):
    monkeypatch.setenv(proctree.LAUNCHER_ENV, "not-a-pid")
    proctree.follow_launcher()  # returns: a worker started by hand with a stray variable runs as if alone


def test_ending_a_reaped_launcher_signals_nothing(monkeypatch):
    """Once torchrun is reaped its pid (and its children's) may be another process's: kill_tree leaves them alone."""
    torchrun = subprocess.Popen([sys.executable, "-c", "pass"])
    torchrun.wait()
    sent = []
    monkeypatch.setattr(proctree, "descendants", lambda pid: [pid + 1])  # what a reused pid's children could look like
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append(pid))
    proctree.kill_tree(torchrun)
    assert sent == []


def report(run_dir: Path, launch_id: str, rank: int, **outcome) -> None:
    (run_dir / EXIT_REPORT.format(rank=rank)).write_text(
        json.dumps({"launch": launch_id, "rank": rank, "host": "h", **outcome})
    )


def test_a_launch_acts_on_its_own_ranks_reports_only(tmp_path):
    """A report left by an earlier launch (or another host's) ends nothing; this launch's user error ends its ranks
    at once and is raised as its own type, outside the wait."""
    report(tmp_path, "earlier", 0, user_error="DataError", message="an old bad row")
    report(tmp_path, "earlier", 2, stopped=int(signal.SIGTERM))
    finishing = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    assert launch.wait_for_ranks(finishing, tmp_path, "this") == 0  # ran to its end, not killed (-9)
    assert launch.take_exit_reports(tmp_path, "this") == []
    hanging = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    report(tmp_path, "this", 1, user_error="DataError", message="pairs.jsonl line 9: chosen == rejected")
    assert launch.wait_for_ranks(hanging, tmp_path, "this") == -signal.SIGKILL
    with pytest.raises(DataError, match="line 9"):
        launch.raise_user_error(launch.take_exit_reports(tmp_path, "this"))
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".rank0.exit.json",
        ".rank2.exit.json",
    ]  # the earlier ones
    launch.remove_exit_reports(tmp_path)  # what a launch does when it takes the run dir
    assert list(tmp_path.iterdir()) == []


def test_a_reported_error_name_is_one_of_the_user_errors(tmp_path):
    # Terminated is in prefopt.core.errors too, but no user error
    with pytest.raises(ConfigError, match="odd") as raised:
        launch.raise_user_error([{"rank": 0, "user_error": "Terminated", "message": "odd"}])
    assert type(raised.value) is ConfigError


def test_a_rank_that_stopped_alone_ends_the_launch(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "LONE_STOP_WAIT_S", 0.5)
    hanging = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the peers in a collective
    report(tmp_path, "this", 1, stopped=int(signal.SIGINT))
    started = time.monotonic()
    assert launch.wait_for_ranks(hanging, tmp_path, "this") == -signal.SIGKILL
    assert time.monotonic() - started < 10


STUBBORN_TORCHRUN = """import subprocess, sys
ignore_sigterm = "import signal, time; signal.signal(signal.SIGTERM, lambda *args: None); time.sleep(60)"
rank = subprocess.Popen([sys.executable, "-c", ignore_sigterm, "prefopt.worker"])
rank.wait()
"""


def test_stopping_ranks_that_never_stop_is_bounded(monkeypatch):
    """Ranks that catch SIGTERM (as in the loop) but never exit: stop_ranks ends them after STOP_WAIT_S."""
    monkeypatch.setattr(launch, "STOP_WAIT_S", 1.0)
    torchrun = subprocess.Popen([sys.executable, "-c", STUBBORN_TORCHRUN])
    deadline = time.time() + 30
    while not [pid for pid in proctree.descendants(torchrun.pid) if proctree.catches(pid, signal.SIGTERM)]:
        assert time.time() < deadline, "the rank never set its handler"
        time.sleep(0.2)
    [rank] = proctree.descendants(torchrun.pid)
    started = time.monotonic()
    launch.stop_ranks(torchrun, signal.SIGTERM)
    assert time.monotonic() - started < 15 and torchrun.poll() is not None and not proctree.running(rank)
