"""hardware=auto and the memory estimate behind it: the choice per model and machine (GPU machines are
injected as fake device lists), the refusal that names what would fit, and the estimate against the peak
RSS of real runs.

Measured on this machine (2 CPU cores, 23.5 GB RAM, 2026-11-25), peak RSS vs estimate, GB = 2^30 bytes:
  tiny_llama, 1 step:                           0.48-0.49 measured, 0.52 estimated (1.04-1.08x)
  smollm2_135m, micro_batch_size 2, 1 step:     3.31-3.45 measured, 3.85 estimated (1.12-1.17x)
  smollm2_135m, default batch (4), 2 steps:     3.59-3.61 measured, 4.51 estimated (1.25-1.26x: arith pairs
                                                are ~53 tokens, the estimate pads them to dataset.max_length=128)
Since the estimate counts the data's tokens (run/step_tokens.py, 2026-12-06): tiny_llama 0.51 estimated (1.03-1.05x);
smollm2_135m micro batch 2: 2.70 (0.78-0.82x); the main job 2.90 against the README's 3.40 measured (0.85x).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.data.layout import BatchLayout, pair_groups
from prefopt.run.examples import DATA_DIR, EXAMPLES_DIR
from prefopt.run.hardware_plan import estimated_run, plan_hardware, preset_values, settle_hardware
from prefopt.run.resources import (
    GB,
    Machine,
    cpu_tflops,
    estimate_memory,
    limits_from,
    llama_parameters,
    model_arch,
    run_shape,
    step_seconds,
    this_machine,
)
from prefopt.run.step_tokens import from_pair_lengths, step_tokens
from tests.helpers import trainer_node
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
# estimate / measured peak RSS: never below (a refusal is honest only if the estimate bounds the run; 1.24-1.27 here)
ESTIMATE_WITHIN = (1.0, 1.6)


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
    run = estimated_run(cfg, this_machine(), limits_from(cfg.hardware))  # what `prefopt train` estimates here
    return estimate_memory(run, preset_values("cpu")).total / GB


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
    assert "tokens counted at dataset.max_length=" in message  # the weights alone do not fit: no tokenizer looked for
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


def test_a_moving_reference_is_a_live_reference_for_the_estimate():
    """TR-DPO's reference cannot be cached: with reference.precompute=auto it is a live copy, held and run each step."""
    moving = run_shape(compose_config(["model=llama3_8b", "reference.sync=hard"]))
    assert moving.reference_forward and moving.holds_reference
    assert estimate_memory(moving, preset_values("gpu")).reference > 0


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


# ---- the token counts: from the data, in the run's layout ---------------------------------------------


@pytest.mark.parametrize(
    "layout",
    [BatchLayout("padded"), BatchLayout("packed"), BatchLayout("packed", None, "dense"), BatchLayout("packed", 40)],
)
def test_positions_are_the_built_batchs_size(layout):
    """BatchLayout.positions, computed from lengths alone, is the size of the batch build() makes."""
    pairs_lengths = [(9, 4, 12), (3, 30, 2), (17, 5, 5), (1, 1, 1), (25, 8, 20)]
    pairs = [SimpleNamespace(prompt_ids=[1] * p, chosen_ids=[2] * c, rejected_ids=[3] * r) for p, c, r in pairs_lengths]
    for count in range(1, len(pairs) + 1):
        batch = layout.build(pair_groups(pairs[:count]), pad_token_id=0)
        assert layout.positions(pairs_lengths[:count]) == batch.input_ids.numel()


def test_sampled_micro_batches_of_equal_pairs():
    """Every pair (10, 5, 7): each micro batch of 3 holds 3 x 22 positions packed, 6 rows of 17 padded."""
    trainer = trainer_node(micro_batch_size=3, grad_accum=2)
    packed = from_pair_lengths([(10, 5, 7)] * 20, trainer, steps=8)
    assert (packed.micro_batch, packed.scored, packed.per_step) == (66, 36, 132)
    padded = from_pair_lengths([(10, 5, 7)] * 20, trainer_node(micro_batch_size=3, batching="padded"), steps=8)
    assert (padded.micro_batch, padded.per_step) == (6 * 17, 6 * 17)
    mixed = from_pair_lengths([(10, 5, 7)] * 19 + [(200, 100, 90)], trainer, steps=8)  # 48 draws: every pair drawn
    assert mixed.micro_batch == 2 * 22 + 390 and mixed.per_step < mixed.micro_batch * 2  # the worst vs the mean


def local_pairs(tmp_path: Path, rows: int = 12) -> Path:
    """Pairs whose tokens the byte tokenizer (tiny models) counts by hand: one per byte, each response + its
    end-of-turn token (dataset.chat_template=never: no template around the prompt)."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            f'{{"prompt": "Q{i:02d}: what is up?", "chosen": " fine thanks", "rejected": " no"}}\n' for i in range(rows)
        )
    )
    return path


def test_the_estimate_counts_the_datas_tokens(tmp_path):
    overrides = [
        "model=tiny_llama",
        "dataset=local",
        f"dataset.path={local_pairs(tmp_path)}",
        "dataset.chat_template=never",
        f"dataset.cache_dir={tmp_path}/cache",
        "trainer.micro_batch_size=2",
        "trainer.grad_accum=2",
    ]
    cfg = compose_config(overrides)
    pair = len("Q00: what is up?") + (len(" fine thanks") + 1) + (len(" no") + 1)  # 33 tokens, the prompt once
    run = estimated_run(cfg, NO_GPU, limits_from(cfg.hardware))
    assert (run.tokens, run.scored_tokens, run.step_tokens) == (2 * pair, 2 * (13 + 4), 2 * 2 * pair)
    assert run.tokens_basis.startswith("from the data's lengths (largest micro batch 66 tokens of 2 pairs")
    tflops = cpu_tflops(NO_GPU, limits_from(cfg.hardware))
    assert step_seconds(run, tflops) == pytest.approx(6 * run.arch.num_parameters * 4 * pair / (tflops * 1e12))
    at_max_length = run_shape(cfg)  # every sequence padded to dataset.max_length=512, as before
    assert at_max_length.tokens == 2 * 2 * 512 and at_max_length.step_tokens == 2 * at_max_length.tokens
    assert (
        estimate_memory(run, preset_values("cpu")).activations
        < estimate_memory(at_max_length, preset_values("cpu")).activations
    )
    assert "from the data's lengths" in cfg.hardware.chosen_by  # the resolver: what --cfg job shows
    padded = compose_config([*overrides, "trainer.batching=padded"])
    assert step_tokens(padded).micro_batch == 2 * 2 * (16 + 13)  # 4 rows as wide as the longest prompt + response


def test_unreadable_data_is_estimated_at_max_length_and_said(tmp_path):
    cfg = compose_config(["model=tiny_llama", "dataset=local", f"dataset.path={tmp_path}/absent.jsonl"])
    tokens = step_tokens(cfg)
    assert tokens.micro_batch == 2 * 4 * 512
    assert tokens.basis.startswith("at dataset.max_length=512 (the data was not read before launch: ")


# The train commands of prefopt/examples/*.sh that run a real model under hardware=auto (lora_zero2.sh names
# hardware=zero2, slurm_sweep.sh hardware=slurm_1gpu, eval_checkpoint.sh trains nothing): their own overrides.
EXAMPLE_CONFIGS = {
    "gate_dpo_local.sh": [
        "loss=gate_dpo",
        "model=smollm2_135m",
        "dataset=ultrafeedback",
        f"dataset.path={EXAMPLES_DIR / DATA_DIR / 'ultrafeedback_sample.jsonl'}",
        "dataset.eval_fraction=0.25",
        "trainer.max_steps=20",
        "trainer.lr=1e-5",
        "trainer.greedy_eval_examples=4",
    ],
    **{
        f"lpo_vs_dpo.sh loss={loss}": [
            f"loss={loss}",
            "model=smollm2_135m",
            "dataset=arith",
            "dataset.arith.rejected_style=offpolicy",
            "trainer.max_steps=30",
            "trainer.lr=1e-5",
            "trainer.lr_schedule=constant_with_warmup",
            "trainer.greedy_eval_examples=0",
            "trainer.save_final=false",
            "dynamics.every_n_steps=10",
        ]
        for loss in ("dpo", "lpo")
    },
}


@pytest.mark.parametrize("example", EXAMPLE_CONFIGS)
def test_each_example_runs_on_this_machines_cpu(example):
    """The estimator against each example's real config on 2 cores and 23.5 GB: the CPU, from the data's lengths.
    gate_dpo_local.sh was refused when every pair was padded to max_length (1,024: ~14 GB, ~66 s per step)."""
    cfg = compose_config(EXAMPLE_CONFIGS[example])
    limits = limits_from(cfg.hardware)
    chosen = plan_hardware(estimated_run(cfg, NO_GPU, limits), NO_GPU, limits)
    assert chosen.values["name"] == "cpu", chosen.values["chosen_by"]
    assert "from the data's lengths" in chosen.values["chosen_by"]
    assert chosen.step_seconds < limits.max_cpu_step_seconds
    if example == "gate_dpo_local.sh":
        with pytest.raises(ConfigError, match="nothing on this machine"):
            plan_hardware(run_shape(cfg), NO_GPU, limits)  # the old estimate, at dataset.max_length
