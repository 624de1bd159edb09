"""Multi-node: the pieces in-process (validation, torchrun's node arguments, rank records, the follower host's
wait), then a real two-host cluster (scripts/slurm/start_local_cluster.sh --nodes 2: network namespaces node1
and node2, a slurmd in each, a controller on their bridge): 2-node and 2x2 DeepSpeed jobs that agree with the
local 2-rank run and really ran on two hosts, requeue + exact resume of a 2-node job, a worker that fails on
node2 only, node2's slurmd killed mid-job, and torchrun across the two hosts without SLURM.

Like tests/test_slurm.py, the cluster tests skip when the two-node cluster is not up, except with CI=true,
where they fail. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prefopt.core.distributed import (
    bind_gloo_to_master_route,
    record_rank,
    torchrun_node_args,
    wait_for_frozen_config,
)
from prefopt.core.errors import ConfigError
from prefopt.core.runfiles import RANKS_FILE
from prefopt.observe.report import build_report
from prefopt.train.checkpoint import checkpoint_candidates, manifest_problem
from tests.helpers import run_train
from tests.test_config import compose_config
from tests.test_slurm import RANK_VARIABLES, REPO, TINY, cluster_state, slurm_client_env, sweeps, train_losses, wait_for  # noqa: F401 (sweeps: a fixture)

TWO_NODE_CONF = Path(
    os.environ.get("PREFOPT_SLURM_2NODE_CONF") or REPO / ".cache" / "slurm" / "two_node" / "etc" / "slurm.conf"
)
START = "bash scripts/slurm/start_local_cluster.sh --nodes 2"
# constant LR: a run's first steps do not depend on trainer.max_steps, so one local run is the reference for all
COMMON = [*TINY, "trainer.lr_schedule=constant", "trainer.eval_every=0", "trainer.save_every=50"]
STEPS = (
    300  # the requeue tests: a 2-node step takes ~25 ms here, so an interrupt after the first checkpoint lands mid-run
)
TWO_NODE = ["hydra/launcher=slurm_local", "hydra.launcher.timeout_min=5", "hardware=slurm_cpu_2node"]


# --- without a cluster ---------------------------------------------------------------------------------


def test_multi_node_presets_compose():
    from hydra import compose, initialize_config_module

    from prefopt.run.config import register_schema

    register_schema()  # conf/config.yaml's prefopt_schema

    with initialize_config_module(config_module="prefopt.conf", version_base="1.3"):
        for hardware, tasks in (("slurm_cpu_2node", 1), ("slurm_cpu_2node_2task", 2)):
            cfg = compose(
                "config", overrides=["hydra/launcher=slurm_local", f"hardware={hardware}"], return_hydra_config=True
            )
            launcher = cfg.hydra.launcher
            assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, cfg.hardware.launcher) == (
                2,
                tasks,
                None,
                "slurm",
            )


def test_torchrun_across_hosts_is_validated():
    from prefopt.run.config import validate_config

    torchrun = ["model=tiny_llama", "hardware=cpu_2proc", "hardware.gpus_per_node=1", "hardware.nodes=2"]
    with pytest.raises(ConfigError, match="hardware.rdzv_endpoint=HOST:PORT"):
        validate_config(compose_config(torchrun))
    validate_config(compose_config([*torchrun, "hardware.rdzv_endpoint=node1:29500", "hardware.node_rank=1"]))
    with pytest.raises(ConfigError, match="hardware.node_rank=2 must be < hardware.nodes=2"):
        validate_config(compose_config([*torchrun, "hardware.rdzv_endpoint=node1:29500", "hardware.node_rank=2"]))
    with pytest.raises(ConfigError, match="must be HOST:PORT"):
        validate_config(compose_config([*torchrun, "hardware.rdzv_endpoint=node1"]))
    with pytest.raises(ConfigError, match="needs a cluster launcher"):
        validate_config(
            compose_config(
                [
                    "model=tiny_llama",
                    "hardware.engine=deepspeed",
                    "hardware.nodes=2",
                    "hardware.rdzv_endpoint=node1:29500",
                ]
            )
        )


def test_torchrun_node_arguments():
    one = OmegaConf.create({"nodes": 1, "node_rank": 0, "rdzv_endpoint": None})
    assert torchrun_node_args(one)[:2] == ["--nnodes=1", "--master_addr=127.0.0.1"]
    two = OmegaConf.create({"nodes": 2, "node_rank": 1, "rdzv_endpoint": "node1:29511"})
    assert torchrun_node_args(two) == ["--nnodes=2", "--node_rank=1", "--master_addr=node1", "--master_port=29511"]


def test_a_follower_host_waits_for_the_frozen_config(tmp_path):
    with pytest.raises(TimeoutError, match="hardware.node_rank=0"):
        wait_for_frozen_config(tmp_path, timeout_s=0.3)
    (tmp_path / "config.yaml").write_text("{}\n")
    assert wait_for_frozen_config(tmp_path, timeout_s=0.3) == tmp_path


def test_every_rank_records_its_host_and_a_new_start_replaces_the_old(tmp_path, monkeypatch):
    for key in (*RANK_VARIABLES, "SLURM_PROCID", "SLURM_STEP_ID", "GLOO_SOCKET_IFNAME"):
        monkeypatch.delenv(key, raising=False)
    hardware = OmegaConf.create({"launcher": "torchrun"})
    for rank in (1, 0):
        for key, value in {
            "RANK": rank,
            "LOCAL_RANK": rank,
            "WORLD_SIZE": 2,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": 1234,
        }.items():
            monkeypatch.setenv(key, str(value))
        record_rank(tmp_path, hardware)
    recorded = json.loads((tmp_path / RANKS_FILE).read_text())
    assert recorded["launch"] == "127.0.0.1:1234" and [entry["rank"] for entry in recorded["ranks"]] == [0, 1]
    assert {entry["address"] for entry in recorded["ranks"]} == {"127.0.0.1"}
    monkeypatch.setenv("MASTER_PORT", "5678")  # the next start of the run (a resume): its ranks only
    record_rank(tmp_path, hardware)
    assert [entry["rank"] for entry in json.loads((tmp_path / RANKS_FILE).read_text())["ranks"]] == [0]
    bind_gloo_to_master_route()  # a master on loopback: one host, gloo keeps its default
    assert "GLOO_SOCKET_IFNAME" not in os.environ


# --- a real two-host cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_env():
    """The two-node cluster's clients (the `sweeps` fixture of tests/test_slurm.py asks for `slurm_env`)."""
    if TWO_NODE_CONF.is_file():
        return slurm_client_env(*cluster_state(str(TWO_NODE_CONF)), start=START)
    return slurm_client_env(None, f"no {TWO_NODE_CONF}", start=START)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slurm_env):
    """The local 2-rank run (torchrun, DeepSpeed on CPU, one host) that every 2-node run must reproduce."""
    return train_losses(
        run_train(tmp_path_factory.mktemp("local") / "run", *COMMON, "hardware=cpu_2proc", f"trainer.max_steps={STEPS}")
    )


def ranks_by_host(run_dir: Path) -> dict[str, list[tuple[int, int]]]:
    """{host: [(rank, local rank), ...]} from the run dir's ranks.json."""
    hosts: dict[str, list[tuple[int, int]]] = {}
    for entry in json.loads((run_dir / RANKS_FILE).read_text())["ranks"]:
        hosts.setdefault(entry["host"], []).append((entry["rank"], entry["local_rank"]))
    return hosts


def assert_same_losses(losses: dict[int, float], expected: dict[int, float], rel: float) -> None:
    for step, loss in losses.items():
        assert loss == pytest.approx(expected[step], rel=rel, abs=1e-7), step


@pytest.mark.slow
def test_a_two_job_sweep_of_two_node_jobs_agrees_with_the_local_two_rank_run(sweeps, tmp_path, reference):
    sweep = sweeps(tmp_path / "sweep", *TWO_NODE, *COMMON, "loss=dpo,ipo", "trainer.max_steps=3")
    returncode, output = sweep.wait(timeout=240)
    assert returncode == 0, output[-3000:]
    assert set(sweep.final_states().values()) == {"COMPLETED"} and len(sweep.job_ids()) == 2
    rows, _ = build_report(sweep.dir)
    assert [row["status"] for row in rows] == ["ok", "ok"]
    for job in ("0", "1"):
        assert ranks_by_host(sweep.dir / job) == {"node1": [(0, 0)], "node2": [(1, 0)]}  # the master is the first node
        assert {entry["interface"] for entry in json.loads((sweep.dir / job / RANKS_FILE).read_text())["ranks"]} == {
            "eth0"
        }  # gloo's
    losses = train_losses(sweep.dir / "0")  # loss=dpo, as the reference
    assert sorted(losses) == [1, 2, 3]
    assert_same_losses(losses, reference, rel=1e-4)


@pytest.mark.slow
def test_a_two_by_two_job_agrees_with_the_local_two_rank_run(sweeps, tmp_path, reference):
    # 4 ranks x 1 pair = the reference's 2 ranks x 2 pairs per step
    sweep = sweeps(
        tmp_path / "sweep",
        *TWO_NODE,
        "hardware=slurm_cpu_2node_2task",
        *COMMON,
        "trainer.micro_batch_size=1",
        "trainer.max_steps=3",
    )
    returncode, output = sweep.wait(timeout=300)
    assert returncode == 0, output[-3000:]
    assert ranks_by_host(sweep.dir / "0") == {"node1": [(0, 0), (1, 1)], "node2": [(2, 0), (3, 1)]}
    assert_same_losses(train_losses(sweep.dir / "0"), reference, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", ["scontrol requeue", "time-limit signal"])
def test_a_requeued_two_node_job_resumes_from_its_checkpoint(sweeps, tmp_path, reference, interrupt):
    sweep = sweeps(tmp_path / "sweep", *TWO_NODE, *COMMON, f"trainer.max_steps={STEPS}")
    job_dir = sweep.dir / "0"
    wait_for(
        lambda: (job_dir / "checkpoints" / "latest").is_file() or sweep.process.poll() is not None,
        180,
        "a first checkpoint",
    )
    [job] = sweep.job_ids()
    sweep.slurm("scontrol", "requeue", job) if interrupt == "scontrol requeue" else sweep.slurm(
        "scancel", "--signal=USR2", job
    )
    returncode, output = sweep.wait(timeout=240)
    assert returncode == 0, output[-3000:]
    log = (job_dir / "cli.log").read_text()
    assert "SLURM requeued this job (restart 1)" in log, log[-3000:]
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", log).group(1))
    assert 50 <= resumed_at < STEPS, "the job was not interrupted mid-run"
    assert sweep.final_states() == {job: "COMPLETED"}
    assert json.loads((job_dir / RANKS_FILE).read_text())["launch"].endswith(
        ".1"
    )  # recorded again by the requeued start
    assert set(ranks_by_host(job_dir)) == {"node1", "node2"}
    resumed = train_losses(job_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert_same_losses(resumed, reference, rel=1e-6)


FAIL_ON_NODE2 = """
# sitecustomize for one test: on host node2 only, the trainer's once-per-step poll of the stop flags raises at step 20,
# mid-training, while the rank on node1 waits for it in that poll's collective
import importlib.abc, importlib.util, socket, sys

class FailOnNode2(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "prefopt.core.slurm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            original, calls = module.Preemption.local_flags, []

            def failing_poll(self):
                calls.append(1)
                if len(calls) == 20:
                    raise RuntimeError("injected failure on " + socket.gethostname())
                return original(self)

            module.Preemption.local_flags = failing_poll

        spec.loader.exec_module = exec_module
        return spec

if socket.gethostname() == "node2":
    sys.meta_path.insert(0, FailOnNode2())
"""


@pytest.mark.slow
def test_a_worker_failing_on_node2_ends_the_job_and_is_reported(sweeps, tmp_path, slurm_env):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAIL_ON_NODE2)
    sweep = sweeps(
        tmp_path / "sweep",
        *TWO_NODE,
        *COMMON,
        "trainer.max_steps=100000",
        env={**slurm_env, "PYTHONPATH": f"{inject}{os.pathsep}{slurm_env['PYTHONPATH']}"},
    )
    returncode, output = sweep.wait(timeout=180)  # bounded: srun --kill-on-bad-exit ends node1's rank too
    assert returncode == 1, output[-3000:]
    [job] = sweep.job_ids()
    assert sweep.final_states() == {job: "FAILED"}
    assert "rank 1 on node2" in output and "RuntimeError: injected failure on node2" in output, output[-3000:]
    assert f"job log: {sweep.dir / '.submitit' / job}" in output
    assert "injected failure on node2" in (sweep.dir / "0" / "error-rank1.txt").read_text()
    assert max(train_losses(sweep.dir / "0")) in (19, 20)  # it stopped where node2 failed (step 20's poll)
    rows, _ = build_report(sweep.dir)
    assert rows[0]["status"] == "failed"


@pytest.mark.slow
def test_torchrun_across_two_hosts_without_slurm(tmp_path, slurm_env, reference):
    """One `prefopt train` per host, the same run dir path: node_rank 0 validates, freezes and locks it; node_rank 1
    writes nothing there (hydra.output_subdir=null) and waits for it. Plain `ip netns exec`: both hosts keep this
    machine's name, which resolves to 127.0.0.1, so gloo reaches the other host only because prefopt binds it to
    the interface that routes to the master."""
    run_dir, port = tmp_path / "run", 29_000 + os.getpid() % 1000
    env = {key: value for key, value in slurm_env.items() if key != "SLURM_CONF"}
    common = [
        *COMMON,
        "hardware=cpu_2proc",
        "hardware.gpus_per_node=1",
        "hardware.nodes=2",
        f"hardware.rdzv_endpoint=node1:{port}",
        "trainer.max_steps=3",
        f"hydra.run.dir={run_dir}",
    ]
    hosts = {
        node_rank: subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                f"prefopt-node{node_rank + 1}",
                sys.executable,
                "-m",
                "prefopt.cli",
                "train",
                *common,
                f"hardware.node_rank={node_rank}",
                *(["hydra.output_subdir=null"] if node_rank else []),
            ],
            cwd=REPO,
            env=env,
            stdout=(tmp_path / f"node{node_rank + 1}.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for node_rank in (1, 0)
    }  # the follower first: it waits for node_rank 0
    try:
        for node_rank, process in hosts.items():
            assert process.wait(timeout=240) == 0, (tmp_path / f"node{node_rank + 1}.log").read_text()[-3000:]
    finally:
        for process in hosts.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    ranks = json.loads((run_dir / RANKS_FILE).read_text())["ranks"]
    assert [(entry["rank"], entry["address"], entry["interface"]) for entry in ranks] == [
        (0, socket.gethostbyname("node1"), "eth0"),
        (1, socket.gethostbyname("node2"), "eth0"),
    ]
    assert "hardware.node_rank=0" in (run_dir / "overrides.yaml").read_text()  # frozen by node_rank 0 only
    assert "hardware.node_rank=0" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert (
        "hardware.node_rank=0" in json.loads((run_dir / ".prefopt.lock").read_text())["command"]
    )  # the run dir's owner
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3]
    assert_same_losses(losses, reference, rel=1e-4)


@pytest.mark.slow
def test_losing_node2s_slurmd_fails_the_job_and_its_checkpoint_resumes(sweeps, tmp_path, slurm_env):
    """node2's slurmd is SIGKILLed mid-job: the controller declares node2 down after SlurmdTimeout (15 s here)
    and the job NODE_FAIL (not requeued: --no-requeue), and the sweep reports it. Its checkpoints are intact:
    a new sweep, once node2 is back, resumes from the one before and repeats the logged steps exactly."""
    two_dir = TWO_NODE_CONF.parents[1]
    overrides = [*TWO_NODE, *COMMON, "trainer.max_steps=100000"]
    sweep = sweeps(tmp_path / "sweep", *overrides, "+hydra.launcher.additional_parameters.no_requeue=true")
    job_dir = sweep.dir / "0"
    try:
        wait_for(
            lambda: (job_dir / "checkpoints" / "latest").is_file() or sweep.process.poll() is not None,
            180,
            "a first checkpoint",
        )
        killed = time.monotonic()
        os.kill(int((two_dir / "run" / "slurmd-node2.pid").read_text()), signal.SIGKILL)
        returncode, output = sweep.wait(timeout=150)
        assert returncode == 1 and "ended NODE_FAIL" in output and "job log:" in output, output[-3000:]
        assert time.monotonic() - killed < 120
        [job] = sweep.job_ids()
        assert sweep.final_states() == {job: "NODE_FAIL"}
        assert build_report(sweep.dir)[0][0]["status"] == "failed"
    finally:  # node2 back for whatever runs next (the script restarts only what is missing)
        subprocess.run(
            ["bash", "scripts/slurm/start_two_node_cluster.sh"],
            cwd=REPO,
            env={**slurm_env, "SLURM_DIR": str(two_dir.parent)},
            check=True,
            timeout=120,
            capture_output=True,
        )
    newest, older = checkpoint_candidates(job_dir)[:2]
    assert manifest_problem(newest) is None and manifest_problem(older) is None
    logged = train_losses(job_dir)
    last = max(logged)
    assert int(newest.name.split("-")[1]) <= last
    resume = sweeps(tmp_path / "resume", *overrides, f"trainer.resume={older}", f"trainer.stop_after={last}")
    returncode, output = resume.wait(timeout=180)
    assert returncode == 0, output[-3000:]
    assert f"resumed from {older} at step {int(older.name.split('-')[1])}" in (resume.dir / "0" / "cli.log").read_text()
    resumed = train_losses(job_dir)
    assert sorted(resumed) == list(range(1, last + 1))
    assert_same_losses(resumed, logged, rel=1e-6)
