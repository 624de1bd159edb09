"""hardware=auto and the memory estimate behind it: the choice per model and machine (GPU machines are
injected as fake device lists), the refusal that names what would fit, and the estimate against the peak
RSS of real runs.

Measured on this machine (2 CPU cores, 23.5 GB RAM, 2026-11-25), peak RSS vs estimate, GB = 2^30 bytes:
  tiny_llama, 1 step:                           0.48-0.49 measured, 0.52 estimated (1.04-1.08x)
  smollm2_135m, micro_batch_size 2, 1 step:     3.31-3.45 measured, 3.85 estimated (1.12-1.17x)
  smollm2_135m, default batch (4), 2 steps:     3.59-3.61 measured, 4.51 estimated (1.25-1.26x: arith pairs
                                                are ~53 tokens, the estimate pads them to dataset.max_length=128)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.run.hardware_plan import plan_hardware, preset_values, settle_hardware
from prefopt.run.resources import GB, Machine, estimate_memory, limits_from, llama_parameters, model_arch, run_shape
from tests.test_config import compose_config, run_prefopt

REPO = Path(__file__).resolve().parents[1]
NO_GPU = Machine(ram_bytes=int(23.5 * GB), cpu_cores=2)  # this machine
SHORT_RUN = [
    "trainer.max_steps=1",
    "dynamics.enabled=false",
    "trainer.greedy_eval_examples=0",
    "dataset.arith.num_eval=4",
    "logger.wandb.mode=disabled",
    "trainer.save_final=false",
]
ESTIMATE_WITHIN = (0.6, 1.6)  # estimate / measured peak RSS


def gpus(count: int, gigabytes: int = 80) -> Machine:
    return Machine(ram_bytes=1024 * GB, cpu_cores=16, gpu_bytes=(gigabytes * GB,) * count)


def plan(overrides: list[str], machine: Machine):
    cfg = compose_config(overrides)
    return plan_hardware(run_shape(cfg), machine, limits_from(cfg.hardware))


def refusal(overrides: list[str], machine: Machine) -> str:
    with pytest.raises(ConfigError) as error:
        plan(overrides, machine)
    return str(error.value)


def run_measured(args: list[str], timeout: float = 600) -> tuple[int, float, str]:
    """`python -m prefopt.cli ARGS` in a child process: (exit code, its own peak RSS in GB, stderr).

    Started from a small wrapper process, so the measured child never begins as a copy of this (large,
    long-lived) pytest process: a forked child's peak RSS counts the parent's pages it starts with."""
    wrapper = (
        "import os, subprocess, sys; process = subprocess.Popen(sys.argv[1:]); _, status, usage = "
        "os.wait4(process.pid, 0); print(usage.ru_maxrss, file=sys.stderr); "
        "sys.exit(os.waitstatus_to_exitcode(status))"
    )
    result = subprocess.run(
        [sys.executable, "-c", wrapper, sys.executable, "-m", "prefopt.cli", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )
    *lines, peak_kb = result.stderr.rstrip().splitlines()
    return result.returncode, int(peak_kb) * 1024 / GB, "\n".join(lines)


def estimated_gb(overrides: list[str]) -> float:
    cfg = compose_config(overrides)
    return estimate_memory(run_shape(cfg), preset_values("cpu")).total / GB


# ---- the refusal, end to end --------------------------------------------------------------------------


def test_llama3_8b_without_gpus_refuses_in_seconds(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    start = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt.cli",
            "train",
            "loss=gate_dpo",
            "model=llama3_8b",
            f"hydra.run.dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    message = result.stderr
    assert "Traceback" not in message
    assert "hardware=auto: nothing on this machine" in message and "llama3_8b" in message
    for alternative in (
        "hardware=zero",
        "hardware.gpus_per_node=",
        "hardware=zero3_offload",
        "model.lora.enabled=true",
    ):
        assert alternative in message, alternative
    assert message.count(" GB per GPU") >= 3  # an estimate for each alternative
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run dir was frozen
    assert elapsed < 30, f"took {elapsed:.1f} s (2 s on 2 idle cores): it must not load anything"


# ---- the choice ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny_llama", "smollm2_135m"])
def test_small_models_run_on_the_cpu(model):
    assert plan([f"model={model}"], NO_GPU).values["name"] == "cpu"
    assert plan([f"model={model}"], gpus(8)).values["name"] == "cpu"  # the CPU first: same numbers on every machine
    cfg = compose_config([f"model={model}"])  # the resolver, on this machine
    assert cfg.hardware.name == "cpu" and cfg.hardware.chosen_by.startswith("auto: ~")


def test_8b_on_one_80gb_gpu_refuses_but_lora_fits():
    message = refusal(["model=llama3_8b"], gpus(1))
    assert "1 GPU of 80 GB" in message
    assert "model.lora.enabled=true: fits here (hardware=gpu)" in message
    assert "hardware=zero" in message and "GPUs of 80 GB" in message  # ZeRO across more GPUs of this size
    chosen = plan(["model=llama3_8b", "model.lora.enabled=true"], gpus(1))
    assert chosen.values["name"] == "gpu" and chosen.estimate.total < 72 * GB


def test_8b_on_eight_gpus_takes_the_smallest_zero_stage_that_fits():
    roomy = plan(["model=llama3_8b"], gpus(8, 80)).values
    assert (roomy["name"], roomy["engine"], roomy["launcher"], roomy["gpus_per_node"]) == (
        "zero1",
        "deepspeed",
        "torchrun",
        8,
    )
    assert (
        plan(["model=llama3_8b", "reference.precompute=false"], gpus(8, 40)).values["name"] == "zero3"
    )  # less memory: a higher stage
    assert "model.lora.enabled=true: fits here" in refusal(
        ["model=llama3_8b", "reference.precompute=false"], gpus(8, 24)
    )


def test_no_cpu_time_sends_small_models_to_the_gpus():
    overrides = ["model=smollm2_135m", "hardware.max_cpu_step_seconds=0"]
    assert plan(overrides, gpus(1)).values["name"] == "gpu"
    several = plan(overrides, gpus(4)).values
    assert (several["name"], several["gpus_per_node"]) == ("zero1", 4)
    assert "hardware.max_cpu_step_seconds=0" in refusal(overrides, NO_GPU)


def test_precompute_and_reference_free_losses_hold_no_reference():
    with_reference = run_shape(compose_config(["model=llama3_8b", "reference.precompute=false"]))
    assert with_reference.holds_reference
    for overrides in ([], ["reference.precompute=true"], ["loss=simpo"], ["model.lora.enabled=true"]):  # [] = auto
        run = run_shape(compose_config(["model=llama3_8b", *overrides]))
        assert not run.holds_reference, overrides
        assert estimate_memory(run, preset_values("gpu")).reference == 0


def test_an_explicit_preset_warns_and_runs(caplog):
    cfg = compose_config(["model=llama3_8b", "hardware=cpu"])
    assert settle_hardware(cfg, NO_GPU) is None
    assert "will likely run out of memory" in caplog.text and cfg.hardware.name == "cpu"
    caplog.clear()
    settle_hardware(compose_config(["model=tiny_llama", "hardware=cpu"]), NO_GPU)
    assert "run out of memory" not in caplog.text


def test_settling_replaces_every_auto_key_but_the_users():
    cfg = compose_config(["model=tiny_llama", "hardware.num_threads=1"])
    settle_hardware(cfg, NO_GPU)
    raw = OmegaConf.to_container(cfg.hardware, resolve=False)
    assert not any("${" in str(value) for value in raw.values())
    assert raw["name"] == "cpu" and raw["num_threads"] == 1 and raw["chosen_by"].startswith("auto: ~")


def test_cfg_job_shows_the_chosen_preset():
    result = run_prefopt("train", "model=tiny_llama", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    hardware = OmegaConf.create(result.stdout).hardware
    assert hardware.name == "cpu" and "GB estimated peak on the CPU" in hardware.chosen_by


def test_a_sweep_chooses_per_job(tmp_path):
    """Job 0 (tiny) trains on the CPU; job 1 (8B, no GPU) is refused in its own run dir; the sweep goes on."""
    result = run_prefopt(
        "train", "-m", "model=tiny_llama,llama3_8b", *SHORT_RUN, f"hydra.sweep.dir={tmp_path}", timeout=300
    )
    assert result.returncode != 0  # a failed job fails the sweep at its end
    tiny = OmegaConf.load(tmp_path / "0" / "config.yaml").hardware
    assert tiny.name == "cpu" and tiny.chosen_by.startswith("auto: ~")
    assert "hardware=auto: nothing on this machine" in (tmp_path / "1" / "error.txt").read_text()


# ---- the figures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["llama3_8b", "llama3_2_1b", "smollm2_135m"])
def test_preset_parameter_counts_match_their_figures(model):
    arch = model_arch(compose_config([f"model={model}"]).model)
    assert arch.num_parameters == llama_parameters(
        arch.hidden_size,
        arch.num_layers,
        arch.vocab_size,
        arch.num_heads,
        arch.num_kv_heads,
        arch.intermediate_size,
        arch.tie_word_embeddings,
    )


def test_tiny_and_local_figures_match_the_built_model(tmp_path):
    from prefopt.model.loading import build_byte_tokenizer, load_model, resolve_model_source

    model_cfg = compose_config(["model=tiny_llama"]).model
    model = load_model(model_cfg, resolve_model_source(model_cfg), len(build_byte_tokenizer()), seed=0)
    assert model_arch(model_cfg).num_parameters == sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path / "saved")  # a local model.path: config.json and the safetensors headers, no weights
    local = compose_config(["model=llama3_8b", f"model.path={tmp_path}/saved"]).model
    arch = model_arch(local)
    assert (arch.num_parameters, arch.hidden_size, arch.num_layers) == (
        sum(p.numel() for p in model.parameters()),
        64,
        2,
    )


def test_a_model_without_figures_cannot_be_sized():
    cfg = compose_config(["model=llama3_8b", "model.path=someone/unknown-model", "model.arch.hidden_size=null"])
    with pytest.raises(ConfigError, match=r"model\.arch\.hidden_size"):
        settle_hardware(cfg, NO_GPU)
    assert (
        compose_config(["model=llama3_8b", "model.arch.hidden_size=null"]).hardware.name == "auto"
    )  # --cfg job still shows it


# ---- estimate vs measured ------------------------------------------------------------------------------


def assert_estimate_close(overrides: list[str], tmp_path: Path) -> None:
    returncode, measured, stderr = run_measured(["train", *overrides, f"hydra.run.dir={tmp_path}/run"])
    assert returncode == 0, stderr
    estimated = estimated_gb(overrides)
    low, high = ESTIMATE_WITHIN
    assert low <= estimated / measured <= high, f"estimated {estimated:.2f} GB, measured peak RSS {measured:.2f} GB"
    assert "${" not in (tmp_path / "run" / "config.yaml").read_text()  # the worker read concrete values, never `auto`
    frozen = OmegaConf.load(tmp_path / "run" / "config.yaml").hardware  # the run recorded auto's choice
    assert frozen.name == "cpu" and frozen.chosen_by.startswith(f"auto: ~{estimated:.1f} GB estimated peak on the CPU")


def test_estimate_matches_a_tiny_run(tmp_path):
    assert_estimate_close(["model=tiny_llama", *SHORT_RUN], tmp_path)


@pytest.mark.slow
def test_estimate_matches_a_smollm2_run(tmp_path):
    assert_estimate_close(["model=smollm2_135m", "trainer.micro_batch_size=2", *SHORT_RUN], tmp_path)
