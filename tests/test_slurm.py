"""SLURM: rank mapping, run-dir preparation and preemption in-process; then a real cluster (the one of
scripts/slurm/start_local_cluster.sh): sweeps through hydra/launcher=slurm_local, a 2-task DeepSpeed job,
requeue + exact resume, a failing job, a cancelled job, and the sbatch script.

The cluster tests skip when no SLURM is up, except with CI=true, where they fail. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prefopt.core.distributed import DistInfo, export_slurm_ranks, first_slurm_host
from prefopt.core.runfiles import PREPARED_FILE
from prefopt.core.slurm import Preemption, prepare_once
from prefopt.observe.report import build_report
from prefopt.observe.tracking import read_jsonl
from tests.helpers import run_train

REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM_CONF = REPO / ".cache" / "slurm" / "etc" / "slurm.conf"  # where start_local_cluster.sh writes it
TINY = [
    "model=tiny_llama",
    "trainer.micro_batch_size=2",
    "trainer.eval_batch_size=4",
    "trainer.lr=1e-3",
    "trainer.warmup_steps=0",
    "dataset.arith.num_train=32",
    "dataset.arith.num_eval=4",
    "trainer.greedy_eval_examples=0",
    "trainer.save_final=false",
    "dynamics.enabled=false",
    "logger.wandb.mode=disabled",
    "hardware.num_threads=1",
]
SLURM = ["hydra/launcher=slurm_local", "hydra.launcher.timeout_min=5"]
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# --- without a cluster ---------------------------------------------------------------------------------


def test_first_host_of_a_slurm_node_list():
    assert first_slurm_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_slurm_host("node1,node2") == "node1"
    assert first_slurm_host("c[001-004]-ib,d1") == "c001-ib"
    assert first_slurm_host("vm") == "vm"


def test_slurm_task_variables_become_torch_ranks(monkeypatch):
    for key, value in {
        "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
        "SLURM_NTASKS": "16",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "4242",
        "RANK": "0",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(key, value)  # RANK/MASTER_PORT: stale values from the submitting shell must not win
    for key in RANK_VARIABLES:
        monkeypatch.setenv(key, os.environ.get(key, ""))  # restored after the test
    export_slurm_ranks()
    assert [os.environ[key] for key in RANK_VARIABLES] == ["11", "3", "16", "8", "gpu07", str(20_000 + 4242)]


def test_rank_zero_prepares_the_run_dir_once_and_the_others_wait(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    (tmp_path / PREPARED_FILE).write_text("77.0\nok\n/stale/attempt\n")  # left by the job's first start
    prepared, seen = [], []

    def other_rank():
        monkeypatch.setenv("SLURM_PROCID", "1")
        seen.append(prepare_once(lambda: prepared.append("rank 1") or tmp_path, tmp_path, timeout_s=30))

    waiting = threading.Thread(target=other_rank)
    waiting.start()
    time.sleep(1.0)
    assert seen == [] and waiting.is_alive()  # a previous attempt's verdict does not count
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert prepare_once(lambda: prepared.append("rank 0") or tmp_path / "run", tmp_path) == tmp_path / "run"
    waiting.join(timeout=30)
    assert seen == [tmp_path / "run"] and prepared == ["rank 0"]

    def bad():
        raise ValueError("trainer.lr=-1 is impossible")

    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    with pytest.raises(ValueError):
        prepare_once(bad, tmp_path)
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(RuntimeError, match="lr=-1"):
        prepare_once(bad, tmp_path, timeout_s=5)


def test_preemption_signals_are_flags_once_the_trainer_polls(monkeypatch):
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    preemption = Preemption()
    assert preemption.local_flags() == [0.0, 0.0]  # outside SLURM: no signal handler is touched
    assert preemption.previous_handlers == {}
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    requeued = []
    try:
        assert preemption.local_flags() == [0.0, 0.0]  # arms: USR2 and SIGTERM set flags from now on
        os.kill(os.getpid(), signal.SIGUSR2)
        assert preemption.local_flags() == [1.0, 0.0]
        preemption.previous_handlers[signal.SIGUSR2] = lambda signum, frame: requeued.append(signum) or sys.exit(-1)
        with pytest.raises(SystemExit):
            preemption.requeue(DistInfo())  # rank 0 hands over to submitit's handler: re-pickle, requeue, exit
        assert requeued == [signal.SIGUSR2]

        terminated = Preemption()
        terminated.local_flags()
        os.kill(os.getpid(), signal.SIGTERM)
        assert terminated.local_flags() == [0.0, 1.0]
        with pytest.raises(SystemExit) as leaving:
            terminated.requeue(DistInfo())  # SLURM is ending or requeueing the job itself: only leave
        assert leaving.value.code == 143
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_a_requeued_worker_resumes_its_run_dir(tmp_path, monkeypatch):
    from prefopt.run.worker import run_worker

    common = [
        "model=tiny_llama",
        "trainer.micro_batch_size=2",
        "dataset.arith.num_train=16",
        "dataset.arith.num_eval=4",
        "trainer.greedy_eval_examples=0",
        "logger.wandb.mode=disabled",
        "dynamics.enabled=false",
        "trainer.max_steps=4",
        "trainer.save_every=2",
        "trainer.eval_every=0",
    ]
    run_dir = run_train(tmp_path / "run", *common, "trainer.stop_after=2")  # as if killed after step 2
    frozen = OmegaConf.load(run_dir / "config.yaml")
    frozen.trainer.stop_after = None
    OmegaConf.save(frozen, run_dir / "config.yaml")
    assert frozen.trainer.resume is False
    monkeypatch.setenv(
        "SLURM_RESTART_COUNT", "1"
    )  # what a requeued job sees; the frozen config still says resume: false
    summary = run_worker(run_dir / "config.yaml")
    assert summary["steps"] == 4
    assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row] == [1, 2, 3, 4]


def test_slurm_presets_compose():
    from hydra import compose, initialize_config_module

    from prefopt.run.config import register_schema

    register_schema()  # conf/config.yaml's prefopt_schema

    with initialize_config_module(config_module="prefopt.conf", version_base="1.3"):
        for hardware, nodes, tasks in (
            ("slurm_1gpu", 1, 1),
            ("slurm_8gpu", 1, 8),
            ("slurm_2x8gpu", 2, 8),
            ("slurm_cpu_2proc", 1, 2),
        ):
            cfg = compose(
                "config", overrides=["hydra/launcher=slurm", f"hardware={hardware}"], return_hydra_config=True
            )
            launcher = cfg.hydra.launcher
            assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (nodes, tasks, tasks), hardware
            assert cfg.hardware.launcher == "slurm" and launcher._target_.endswith(
                "prefopt_slurm_launcher.launcher.SlurmLauncher"
            )
        local = compose(
            "config", overrides=["hydra/launcher=slurm_local", "hardware=slurm_cpu_2proc"], return_hydra_config=True
        )
        assert (local.hydra.launcher.tasks_per_node, local.hydra.launcher.gpus_per_node) == (2, None)


# --- a real cluster ------------------------------------------------------------------------------------


def cluster_state(conf: str | None = None) -> tuple[str | None, str]:
    """(SLURM_CONF of a cluster that answers, "") or (None, why not); by default the one-node cluster's."""
    conf = conf or os.environ.get("SLURM_CONF") or (str(LOCAL_SLURM_CONF) if LOCAL_SLURM_CONF.is_file() else None)
    if shutil.which("sinfo") is None:
        return None, "sinfo is not installed"
    if conf is None:
        return None, "no SLURM_CONF and no local cluster config"
    try:
        states = subprocess.run(
            ["sinfo", "-h", "-o", "%T"],
            env={**os.environ, "SLURM_CONF": conf},
            capture_output=True,
            text=True,
            timeout=15,
        )
    except subprocess.TimeoutExpired:
        return None, "sinfo did not answer within 15 s"
    if states.returncode != 0 or not {"idle", "mixed", "allocated"} & set(states.stdout.split()):
        return None, f"sinfo: {(states.stderr or states.stdout).strip()[:200]}"
    return conf, ""


def slurm_client_env(conf: str | None, reason: str, start: str = "bash scripts/slurm/start_local_cluster.sh") -> dict:
    """The environment of SLURM clients (sbatch, sacct, `prefopt train -m`) for a cluster that answers; without one
    the test skips, or fails with CI=true. tests/test_slurm_multinode.py uses it for the two-node cluster."""
    if conf is None:
        message = f"no SLURM cluster is up ({reason}); start one: {start}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true needs a running SLURM: " + message)
        pytest.skip(message)
    env = {
        key: value for key, value in os.environ.items() if key not in RANK_VARIABLES
    }  # none from earlier in-process runs
    return {
        **env,
        "SLURM_CONF": conf,
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def slurm_env():
    return slurm_client_env(*cluster_state())


class Sweep:
    """`prefopt train -m` in a subprocess (its own session), its SLURM jobs cancelled whatever happens."""

    def __init__(self, env: dict, sweep_dir: Path, *overrides: str):
        self.env, self.dir = env, sweep_dir
        self.log = sweep_dir.parent / f"{sweep_dir.name}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefopt.cli", "train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
            cwd=REPO,
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> tuple[int, str]:
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            pytest.fail(f"the sweep did not end within {timeout:.0f} s:\n{self.output()[-3000:]}")
        return returncode, self.output()

    def output(self) -> str:
        return self.log.read_text()

    def job_ids(self) -> list[str]:
        """SLURM ids of the sweep's jobs: array elements (1234_0) or single jobs, from the submitit folder."""
        folder = self.dir / ".submitit"
        names = sorted(path.name for path in folder.iterdir() if path.is_dir()) if folder.is_dir() else []
        elements = [name for name in names if "_" in name]
        return elements or names

    def final_states(self, timeout: float = 60) -> dict[str, str]:
        """The jobs' states once SLURM has finished them (the sweep returns as soon as results are written)."""
        wait_for(
            lambda: not {"RUNNING", "PENDING", "COMPLETING", "REQUEUED", ""} & set(self.states().values()),
            timeout,
            "the jobs' end in sacct",
        )
        return self.states()

    def states(self) -> dict[str, str]:
        ids = self.job_ids()
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "JobID,State", *[f"-j{job.split('_')[0]}" for job in ids]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        rows = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
        return {job: rows.get(job, "").split()[0] if rows.get(job) else "" for job in ids}

    def slurm(self, *command: str) -> None:
        subprocess.run(list(command), env=self.env, check=True, timeout=30, capture_output=True)

    def cancel(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        for job in self.job_ids():
            subprocess.run(["scancel", job], env=self.env, timeout=30, capture_output=True)


@pytest.fixture
def sweeps(slurm_env):
    started: list[Sweep] = []

    def start(sweep_dir: Path, *overrides: str, env: dict | None = None) -> Sweep:
        started.append(Sweep(env or slurm_env, sweep_dir, *overrides))
        return started[-1]

    yield start
    for sweep in started:
        sweep.cancel()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.05)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row}


@pytest.fixture(scope="module")
def local_two_rank_losses(tmp_path_factory, slurm_env):
    """The local 2-rank run (torchrun, DeepSpeed on CPU) that the SLURM 2-task job must reproduce."""
    run_dir = run_train(tmp_path_factory.mktemp("local") / "run", *TINY, "hardware=cpu_2proc", "trainer.max_steps=3")
    return train_losses(run_dir)


@pytest.mark.slow
def test_a_two_job_sweep_completes_on_slurm(sweeps, tmp_path):
    sweep = sweeps(
        tmp_path / "sweep", *SLURM, "loss=dpo,ipo", *TINY, "trainer.max_steps=2", "logger.wandb.mode=offline"
    )
    returncode, output = sweep.wait(timeout=240)
    assert returncode == 0, output[-3000:]
    assert len(sweep.job_ids()) == 2
    assert set(sweep.final_states().values()) == {"COMPLETED"}
    rows, _ = build_report(sweep.dir)
    assert [row["status"] for row in rows] == ["ok", "ok"]
    from tests.test_sweeps import wandb_run_record

    assert {wandb_run_record(sweep.dir / job).run_group for job in ("0", "1")} == {"sweep"}


@pytest.mark.slow
def test_a_two_task_job_agrees_with_the_local_two_rank_run(sweeps, tmp_path, local_two_rank_losses):
    sweep = sweeps(tmp_path / "sweep", *SLURM, "hardware=slurm_cpu_2proc", *TINY, "trainer.max_steps=3")
    returncode, output = sweep.wait(timeout=300)
    assert returncode == 0, output[-3000:]
    [job] = sweep.job_ids()
    assert sweep.final_states() == {job: "COMPLETED"}
    assert sorted(path.name for path in (sweep.dir / ".submitit" / job).glob("*_log.out")) == [
        f"{job}_0_log.out",
        f"{job}_1_log.out",
    ]
    losses = train_losses(sweep.dir / "0")
    assert sorted(losses) == [1, 2, 3]  # written once, by rank 0
    for step, expected in local_two_rank_losses.items():
        assert losses[step] == pytest.approx(expected, rel=1e-4), step


STEPS = 900  # long enough that an interrupt lands mid-run: without the trainer's preemption hook a job keeps training
#               for KillWait (2 s here) after SIGTERM, about 300 steps of this tiny model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, slurm_env):
    common = [*TINY, f"trainer.max_steps={STEPS}", "trainer.save_every=10", "trainer.eval_every=0"]
    return common, train_losses(run_train(tmp_path_factory.mktemp("straight") / "run", *common))


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", ["scontrol requeue", "time-limit signal"])
def test_a_requeued_job_resumes_from_its_checkpoint(sweeps, tmp_path, uninterrupted, interrupt):
    common, expected = uninterrupted
    sweep = sweeps(tmp_path / "sweep", *SLURM, *common)
    job_dir = sweep.dir / "0"
    wait_for(
        lambda: (job_dir / "checkpoints" / "latest").is_file() or sweep.process.poll() is not None,
        180,
        "a first checkpoint",
    )
    [job] = sweep.job_ids()
    if interrupt == "scontrol requeue":
        sweep.slurm("scontrol", "requeue", job)
    else:  # what SLURM sends before the time limit (--signal=USR2@signal_delay_s): submitit checkpoints and requeues
        sweep.slurm("scancel", "--signal=USR2", job)
    returncode, output = sweep.wait(timeout=240)
    assert returncode == 0, output[-3000:]
    log = (job_dir / "cli.log").read_text()
    assert "SLURM requeued this job (restart 1)" in log, log[-3000:]
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert 10 <= resumed_at < STEPS, "the job was not interrupted mid-run"
    assert sweep.final_states() == {job: "COMPLETED"}
    resumed = train_losses(job_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def bad_data_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(8)] + [
        {"prompt": "q", "chosen": "same", "rejected": "same"}
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
def test_a_failing_job_fails_the_sweep_with_its_error(sweeps, tmp_path):
    sweep = sweeps(
        tmp_path / "sweep",
        *SLURM,
        *TINY,
        "trainer.max_steps=2",
        "dataset=local",
        f"dataset.path={bad_data_file(tmp_path)}",
        "dataset.on_bad_row=error,skip",
    )
    returncode, output = sweep.wait(timeout=240)
    assert returncode == 1
    assert "line 9" in output and "pairs.jsonl" in output and "Traceback" in output and "job log:" in output, output[
        -3000:
    ]
    failed, ok = sweep.job_ids()
    assert sweep.final_states() == {failed: "FAILED", ok: "COMPLETED"}
    assert "line 9" in (sweep.dir / "0" / "error.txt").read_text()
    assert "line 9" in "".join(
        path.read_text() for path in (sweep.dir / ".submitit" / failed).glob("*_0_log.*")
    )  # the job's own log
    rows, _ = build_report(sweep.dir)
    assert [row["status"] for row in rows] == ["failed", "ok"]


@pytest.mark.slow
def test_the_first_failure_cancels_the_rest_when_asked(sweeps, tmp_path):
    sweep = sweeps(
        tmp_path / "sweep",
        *SLURM,
        *TINY,
        "trainer.max_steps=100000",
        "dataset=local",
        f"dataset.path={bad_data_file(tmp_path)}",
        "dataset.on_bad_row=error,skip",
        "sweep.continue_on_failure=false",
    )
    returncode, output = sweep.wait(timeout=240)
    assert returncode == 1 and "line 9" in output and "cancelled the 1 jobs" in output, output[-3000:]
    failed, running = sweep.job_ids()
    wait_for(lambda: sweep.states()[running].startswith("CANCELLED"), 60, "the second job's cancellation")
    assert sweep.states()[failed] == "FAILED"


@pytest.mark.slow
def test_a_cancelled_job_is_reported_not_waited_on(sweeps, tmp_path):
    sweep = sweeps(tmp_path / "sweep", *SLURM, *TINY, "trainer.max_steps=100000")
    wait_for(
        lambda: train_losses(sweep.dir / "0") if (sweep.dir / "0" / "metrics.jsonl").is_file() else False,
        180,
        "training",
    )
    [job] = sweep.job_ids()
    sweep.slurm("scancel", job)
    returncode, output = sweep.wait(timeout=90)
    assert returncode == 1 and "CANCELLED" in output, output[-3000:]
    assert "CANCELLED" in (sweep.dir / "0" / "error.txt").read_text()
    rows, _ = build_report(sweep.dir)
    assert rows[0]["status"] == "failed"


@pytest.mark.slow
def test_the_sbatch_script_trains_a_frozen_run_dir_on_two_tasks(slurm_env, tmp_path, local_two_rank_losses):
    run_dir = tmp_path / "run"
    freeze = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt.cli",
            "train",
            *TINY,
            "hardware=slurm_cpu_2proc",
            "trainer.max_steps=3",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert freeze.returncode == 0 and "nothing was trained" in freeze.stderr + freeze.stdout
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "metrics.jsonl").exists()
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--ntasks=2",
            "--cpus-per-task=1",
            "--time=5",
            f"--output={tmp_path}/slurm-%j.out",
            str(REPO / "scripts" / "slurm" / "train.sbatch"),
            str(run_dir),
        ],
        cwd=tmp_path,
        env={**slurm_env, "PREFOPT_PYTHON": sys.executable},  # the venv's Python, as a user would set it
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    job = submit.stdout.strip().split(";")[0]
    try:

        def state() -> str:
            out = subprocess.run(
                ["sacct", "-n", "-X", "-P", "-o", "State", f"-j{job}"],
                env=slurm_env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            return out.stdout.strip().split("\n")[0]

        wait_for(
            lambda: state() in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"),
            240,
            f"the end of job {job}",
        )
        assert state() == "COMPLETED", (tmp_path / f"slurm-{job}.out").read_text()[-3000:]
    finally:
        subprocess.run(["scancel", job], env=slurm_env, timeout=30, capture_output=True)
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3]
    for step, expected in local_two_rank_losses.items():
        assert losses[step] == pytest.approx(expected, rel=1e-4), step


class CountingDist(DistInfo):
    """Two ranks as far as the trainer can tell; counts the collectives it is asked for (each returns its input)."""

    def __init__(self) -> None:
        super().__init__(rank=0, world_size=2, initialized=True)
        self.collectives = 0

    def all_reduce(self, values, op=None):
        self.collectives += 1
        return values.clone()


@pytest.mark.parametrize("in_slurm", [False, True])
def test_a_step_agrees_on_preemption_and_stop_signals_in_one_collective(monkeypatch, in_slurm):
    from prefopt.core import slurm
    from prefopt.train.interrupt import DeferredInterrupt

    for name in ("SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.setenv(name, "0") if in_slurm else monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(slurm, "preemption", Preemption())
    monkeypatch.setattr("prefopt.train.interrupt.preemption", slurm.preemption)
    dist, interrupt = CountingDist(), DeferredInterrupt(enabled=False)
    try:
        assert interrupt.requested(dist) == (False, 0)
        interrupt.received = signal.SIGINT
        assert interrupt.requested(dist) == (False, signal.SIGINT)
        if in_slurm:
            slurm.preemption.record(signal.SIGUSR2)
            assert interrupt.requested(dist) == (True, signal.SIGINT)
        assert dist.collectives == (3 if in_slurm else 2)  # one per step, for both
    finally:
        if in_slurm:
            signal.signal(signal.SIGUSR2, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
