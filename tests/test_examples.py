"""examples/ (a link to prefopt/examples/, shipped in the wheel): every recipe runs here at tiny scale through its
own script, the command a user runs, with overrides appended (the last value of a key wins in Hydra):
model=tiny_llama, 2 steps, small data, from a working directory outside the checkout. The SLURM recipe runs on the
local cluster (scripts/slurm/start_local_cluster.sh) and skips without one, or fails with CI=true, as
tests/test_slurm.py does. Fast checks keep every script documented, linked from README.md and tested here, and run
each script against a stand-in prefopt that records what it was asked: which prefopt a script finds (PATH, else its
clone's .venv, else a one-line refusal), that it reads its data beside itself and writes only under the caller's
directory. tests/test_examples_command.py tests `prefopt examples` (list, copy, run); tests/test_install.py copies
and runs one from an installed wheel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prefopt.observe.report import build_report
from prefopt.observe.tracking import read_jsonl
from prefopt.run.examples import EXAMPLES_DIR
from tests.test_slurm import RANK_VARIABLES, Sweep, cluster_state, slurm_client_env

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PREFOPT = f"{sys.executable} -m prefopt.cli"  # the checkout's prefopt (PYTHONPATH: from any directory)
TINY = [
    "model=tiny_llama",
    "trainer.max_steps=2",
    "trainer.micro_batch_size=2",
    "trainer.eval_batch_size=4",
    "trainer.greedy_eval_examples=0",
    "trainer.lr=1e-3",
    "trainer.warmup_steps=0",
    "dynamics.num_probes=2",
    "dynamics.batch_size=4",
    "logger.wandb.mode=disabled",
    "hardware.num_threads=1",
]
SMALL_ARITH = ["dataset.arith.num_train=16", "dataset.arith.num_eval=4"]


def example_env(**extra: str) -> dict:
    """The scripts' environment: the checkout's prefopt, offline, no rank variables left by in-process tests."""
    env = {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES}
    return {
        **env,
        "PREFOPT": PREFOPT,
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def run_example(
    script: str, *overrides: str, env: dict, log: Path, timeout: float = 600, cwd: Path | None = None
) -> str:
    """`bash examples/SCRIPT OVERRIDES` in its own session (in cwd), output to LOG; its output. On a timeout it gets
    Ctrl-C first (prefopt then stops its worker processes, which run in a session of their own), then SIGKILL."""
    with log.open("w") as sink:
        process = subprocess.Popen(
            ["bash", str(EXAMPLES / script), *overrides],
            cwd=cwd,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
            pytest.fail(f"{script} did not end within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
    output = log.read_text()
    assert process.returncode == 0, f"{script} exited {process.returncode}:\n{output[-4000:]}"
    return output


def train_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row]


def example_scripts() -> list[Path]:
    return sorted(EXAMPLES.glob("*.sh"))


def test_every_example_is_documented_linked_and_tested():
    scripts = example_scripts()
    assert len(scripts) >= 4
    readme = (REPO / "README.md").read_text()
    this_file = Path(__file__).read_text()
    for script in scripts:
        text = script.read_text()
        header = text.split("set -euo pipefail")[0]
        assert "What it shows:" in header and "Expected runtime:" in header, f"{script.name}: its header must say both"
        assert '"$@"' in text, f"{script.name} must pass the caller's overrides on"
        checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert checked.returncode == 0, f"{script.name}: {checked.stderr}"
        assert f"examples/{script.name}" in readme, f"README.md does not link examples/{script.name}"
        assert f'"{script.name}"' in this_file, f"no test runs {script.name}"


def test_the_sample_file_is_ultrafeedback_shaped():
    rows = [json.loads(line) for line in (EXAMPLES / "data" / "ultrafeedback_sample.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and len({row["prompt_id"] for row in rows}) == 24
    for row in rows:
        for side in ("chosen", "rejected"):
            assert [turn["role"] for turn in row[side]] == ["user", "assistant"]
            assert row[side][0]["content"] == row["prompt"]
        assert (
            row["chosen"][1]["content"] != row["rejected"][1]["content"] and row["score_chosen"] > row["score_rejected"]
        )


# ---- which prefopt a script runs, where it reads and writes: a stand-in prefopt records each call --------------

PREAMBLE_END = "# ---- run dirs go under the directory you call it from"
RECORDER = """#!/bin/sh
{ echo "cwd=$PWD"; for arg in "$@"; do echo "arg=$arg"; done; echo "name=$0"; echo ----; } >>"$RECORD"
"""


def stand_in(directory: Path, name: str = "prefopt", text: str = RECORDER) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text)
    (directory / name).chmod(0o755)
    return directory


def recorded_calls(record: Path) -> list[dict]:
    """The stand-in's calls: cwd, args (in order) and the path it was called as."""
    calls, call = [], {"args": []}
    for line in record.read_text().splitlines():
        if line == "----":
            calls.append(call)
            call = {"args": []}
        else:
            key, _, value = line.partition("=")
            call["args"].append(value) if key == "arg" else call.update({key: value})
    return calls


def run_script(script: Path, *arguments: str, cwd: Path, path: list[Path], record: Path):
    env = {"PATH": os.pathsep.join([*map(str, path), "/usr/bin", "/bin"]), "RECORD": str(record), "HOME": str(cwd)}
    return subprocess.run(["bash", str(script), *arguments], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_scripts_share_one_preamble_and_never_leave_the_callers_directory():
    scripts = example_scripts()
    assert EXAMPLES.resolve() == REPO / "prefopt" / "examples" == EXAMPLES_DIR  # the link, and what the wheel ships
    preambles = {script.read_text().split("set -euo pipefail")[1].split(PREAMBLE_END)[0] for script in scripts}
    assert len(preambles) == 1, "the prefopt-finding block differs between scripts: keep it one block"
    for script in scripts:
        body = script.read_text().split(PREAMBLE_END)[1]
        assert not re.search(r"^\s*cd\b|\.venv/bin", body, re.M), f"{script.name}: a cd or a fixed prefopt"


# each script, its arguments, and the PATH-valued overrides it must hand prefopt: under the caller's dir (relative)
SCRIPT_CALLS = {
    "gate_dpo_local.sh": ([], ["hydra.run.dir=outputs/examples/gate_dpo_local_"]),
    "lpo_vs_dpo.sh": ([], ["hydra.sweep.dir=outputs/examples/lpo_vs_dpo_", "outputs/examples/lpo_vs_dpo_"]),
    "lora_zero2.sh": ([], ["hydra.run.dir=outputs/examples/lora_zero2_"]),
    "slurm_sweep.sh": ([], ["hydra.sweep.dir=outputs/examples/slurm_sweep_", "outputs/examples/slurm_sweep_"]),
    "eval_checkpoint.sh": (["runs/a"], ["hydra.run.dir=outputs/examples/eval_a_"]),
}


@pytest.mark.parametrize("where", ["path", "clone", "neither"])
def test_a_script_runs_the_prefopt_it_finds_from_any_directory(tmp_path, where):
    """PATH's prefopt first; else the clone's .venv/bin/prefopt when the script is its clone's own; else one line."""
    assert set(SCRIPT_CALLS) == {script.name for script in example_scripts()}
    clone = tmp_path / "clone"
    examples = clone / "prefopt" / "examples"
    shutil.copytree(EXAMPLES_DIR, examples)
    (clone / "pyproject.toml").write_text("")
    stand_in(clone / ".venv" / "bin")
    on_path = [stand_in(tmp_path / "bin"), stand_in(tmp_path / "slurm", "sinfo", "#!/bin/sh\necho idle\n")]
    if where == "clone":
        on_path = on_path[1:]
    elif where == "neither":
        examples = tmp_path / "copy"  # a copy outside any clone
        shutil.copytree(EXAMPLES_DIR, examples)
        on_path = on_path[1:]
    work = tmp_path / "work"
    work.mkdir()
    for name, (arguments, relative_paths) in SCRIPT_CALLS.items():
        record = tmp_path / f"{name}.record"
        done = run_script(examples / name, *arguments, "x=1", cwd=work, path=on_path, record=record)
        if where == "neither":
            assert done.returncode == 127 and not record.exists(), done.stderr
            assert (
                done.stderr == f"{name}: no prefopt command: activate the environment prefopt is installed in, "
                "or set PREFOPT\n"
            )
            continue
        assert done.returncode == 0, f"{name}: {done.stderr}"
        calls = recorded_calls(record)
        expected = str(tmp_path / "bin" / "prefopt") if where == "path" else str(clone / ".venv" / "bin" / "prefopt")
        assert {Path(call["name"]).resolve() for call in calls} == {Path(expected).resolve()}, name
        assert {call["cwd"] for call in calls} == {str(work)}
        arguments_seen = [arg for call in calls for arg in call["args"]]
        for prefix in relative_paths:  # every run and sweep dir named relative: under the caller's directory
            assert any(arg.startswith(prefix) for arg in arguments_seen), (name, prefix, arguments_seen)
        assert "x=1" in calls[0]["args"]  # the caller's overrides passed on
        data = [arg.split("=", 1)[1] for arg in arguments_seen if arg.startswith("dataset.path=")]
        assert all(Path(value) == examples.resolve() / "data" / "ultrafeedback_sample.jsonl" for value in data)
    assert sorted(path.name for path in work.iterdir()) == [], "a script wrote into the caller's directory itself"


def test_slurm_sweep_refuses_clearly_without_a_cluster(tmp_path):
    failing_sinfo = "#!/bin/sh\necho 'sinfo: fatal: Could not establish a configuration source' >&2\nexit 1\n"
    on_path = [stand_in(tmp_path / "bin"), stand_in(tmp_path / "slurm", "sinfo", failing_sinfo)]
    record = tmp_path / "record"
    done = run_script(EXAMPLES / "slurm_sweep.sh", cwd=tmp_path, path=on_path, record=record)
    assert done.returncode == 2 and not record.exists()  # nothing composed or submitted
    assert (
        done.stderr.startswith(
            "slurm_sweep.sh: no SLURM cluster answers here (sinfo: sinfo: fatal: Could not establish a configuration "
            "source): run it on a cluster's login node"
        )
        and "bash scripts/slurm/start_local_cluster.sh" in done.stderr
    )


@pytest.mark.slow
def test_gate_dpo_on_the_local_ultrafeedback_sample(tmp_path):
    output = run_example(
        "gate_dpo_local.sh",
        *TINY,
        "dynamics.enabled=false",
        "trainer.save_final=false",
        env=example_env(),
        log=tmp_path / "example.log",
        cwd=tmp_path,
    )
    run_dir = tmp_path / re.search(r"^run dir: (outputs/examples/gate_dpo_local_\S+)", output, re.M).group(1)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["example.log", "outputs"]  # nothing else written
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.loss.name == "dpo" and config.loss.gate.kind == "seq" and config.dataset.name == "ultrafeedback"
    assert config.dataset.path.endswith("examples/data/ultrafeedback_sample.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data/train/pairs"] + summary["data/eval/pairs"] == 24 and summary["data/eval/pairs"] == 6
    rows = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in row]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(0.0 < row["train/gate/mean"] <= 1.0 for row in rows)  # the gate ran every step


@pytest.mark.slow
def test_lpo_vs_dpo_sweep_and_its_report(tmp_path):
    sweep_dir = tmp_path / "sweep"
    output = run_example(
        "lpo_vs_dpo.sh",
        *TINY,
        *SMALL_ARITH,
        "trainer.seed=0,1",
        env=example_env(SWEEP_DIR=str(sweep_dir)),
        log=tmp_path / "example.log",
    )
    jobs = sorted((path for path in sweep_dir.iterdir() if path.name.isdigit()), key=lambda path: int(path.name))
    configs = [OmegaConf.load(job / "config.yaml") for job in jobs]
    assert sorted((config.loss.name, config.trainer.seed) for config in configs) == [
        ("dpo", 0),
        ("dpo", 1),
        ("lpo", 0),
        ("lpo", 1),
    ]
    assert all(config.dataset.arith.rejected_style == "offpolicy" for config in configs)
    rows, _ = build_report(sweep_dir)
    assert [row["status"] for row in rows] == ["ok"] * 4
    groups = (sweep_dir / "report_groups.md").read_text()
    assert "lpo" in groups and "dpo" in groups and "4 jobs, 0 failed" in output
    assert (sweep_dir / "report_bands.png").is_file()


@pytest.mark.slow
def test_lora_zero2_at_tiny_scale_on_two_cpu_ranks(tmp_path):
    run_dir = tmp_path / "run"
    run_example(
        "lora_zero2.sh",
        *TINY,
        *SMALL_ARITH,
        "hardware.device=cpu",
        "hardware.gpus_per_node=2",
        env=example_env(RUN_DIR=str(run_dir)),
        log=tmp_path / "example.log",
    )
    config = OmegaConf.load(run_dir / "config.yaml")
    assert (
        config.hardware.name,
        config.hardware.engine,
        config.hardware.zero_stage,
        config.hardware.gpus_per_node,
    ) == ("zero2", "deepspeed", 2, 2)
    assert config.model.lora.enabled and config.model.lora.r == 16
    assert train_steps(run_dir) == [1, 2]
    assert list(run_dir.glob("checkpoints/step-*2/policy/adapter_config.json")), "the checkpoint holds the adapters"


@pytest.fixture
def slurm_env():
    return slurm_client_env(*cluster_state())


class ExampleSweep(Sweep):
    """examples/SCRIPT in its own session, its SLURM jobs cancelled whatever happens (tests/test_slurm.py's Sweep)."""

    def __init__(self, env: dict, sweep_dir: Path, script: str, *overrides: str):
        self.env, self.dir = env, sweep_dir
        self.log = sweep_dir.parent / f"{sweep_dir.name}.log"
        self.process = subprocess.Popen(
            ["bash", str(EXAMPLES / script), *overrides],
            env={**env, "PREFOPT": PREFOPT, "SWEEP_DIR": str(sweep_dir)},
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.mark.slow
def test_slurm_sweep_example_on_the_local_cluster(slurm_env, tmp_path):
    sweep = ExampleSweep(
        slurm_env,
        tmp_path / "sweep",
        "slurm_sweep.sh",
        "hydra/launcher=slurm_local",
        "hardware=cpu",
        "hydra.launcher.timeout_min=5",
        "loss=dpo,gate_dpo",
        "trainer.seed=0",
        *TINY,
        *SMALL_ARITH,
    )
    try:
        returncode, output = sweep.wait(timeout=300)
        assert returncode == 0, output[-4000:]
        assert len(sweep.job_ids()) == 2 and set(sweep.final_states().values()) == {"COMPLETED"}
        rows, _ = build_report(sweep.dir)
        assert [row["status"] for row in rows] == ["ok", "ok"]
        assert re.search(r"2 jobs, 0 failed; wrote .*report_groups\.md", output), output[-2000:]
    finally:
        sweep.cancel()


@pytest.mark.slow
def test_eval_of_a_trained_runs_checkpoint(tmp_path):
    from tests.helpers import run_train

    run_dir = run_train(tmp_path / "run", *TINY, *SMALL_ARITH, "loss=gate_dpo")
    eval_dir = tmp_path / "eval"
    output = run_example(
        "eval_checkpoint.sh",
        str(run_dir),
        "logger.wandb.mode=disabled",
        "hardware=cpu",
        env=example_env(EVAL_DIR=str(eval_dir)),
        log=tmp_path / "example.log",
    )
    trained = json.loads((run_dir / "summary.json").read_text())
    evaluated = json.loads((eval_dir / "summary.json").read_text())
    for key in ("eval/loss", "eval/rewards/margins", "eval/logps/chosen", "eval/logps/rejected"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-4), key  # the run's own final eval, reproduced
    assert sorted({row["step"] for row in read_jsonl(eval_dir / "metrics.jsonl") if "eval/loss" in row}) == [0, 2]
    assert (eval_dir / "run_and_eval.png").is_file() and "wrote" in output
