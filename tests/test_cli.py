"""The command line around the Hydra apps (prefopt/cli.py, prefopt/run/confhelp.py): `prefopt train --help` read from
conf/ without Hydra (and agreeing with what Hydra composes), did-you-mean for unknown keys and options, and shell
completion of every subcommand through the script a user installs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from prefopt.cli import COMMANDS
from prefopt.core.errors import ConfigError, did_you_mean
from prefopt.run.app import unknown_key_line, unknown_option_line
from prefopt.run.confhelp import GROUP_DIRS, group_options, help_text, option_keys, read_config_file
from prefopt.run.config import register_schema
from tests.test_config import CONF, compose_config

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=REPO, env=env or os.environ.copy()
    )


def leaves(node, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of a plain nested dict."""
    found = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            found |= leaves(value, f"{prefix}{key}.")
        else:
            found[f"{prefix}{key}"] = value
    return found


def yaml_comment(path: Path, key: str) -> str:
    """The comment on `key`'s line: each part of the dotted key found in turn, below the one before."""
    lines, start = path.read_text().splitlines(), 0
    for part in key.split("."):
        start = next(index for index in range(start, len(lines)) if lines[index].strip().startswith(f"{part}:"))
    return lines[start].split(" # ", 1)[1].strip()


# ---- help -------------------------------------------------------------------------------------------------------


def test_train_help_starts_without_hydra_and_lists_groups_options_and_every_key_with_its_comment():
    wide = {**os.environ, "COLUMNS": "1000"}  # nothing clipped: each comment whole
    result = run_cli("-X", "importtime", "-m", "prefopt.cli", "train", "--help", env=wide)
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not {name for name in imported if name.split(".")[0] in ("hydra", "omegaconf", "torch")}
    text = result.stdout
    assert text.startswith("prefopt train: compose a run") and "Hydra" not in text.splitlines()[0]
    assert "powered by Hydra" not in text
    for group in ("loss", "model", "dataset", "hardware"):  # every option file of every group is offered
        listed = next(line for line in text.splitlines() if line.strip().startswith(f"{group}="))
        assert set(group_options(group)) <= {word.strip("|()") for word in listed.split()}
    root = yaml.safe_load((CONF / "config.yaml").read_text())  # an independent read of the keys
    for key in leaves({name: value for name, value in root.items() if name not in ("defaults", "hydra", "eval")}):
        comment = yaml_comment(CONF / "config.yaml", key)
        assert f"  {key}=" in text, key
        assert comment in text, (key, comment)
    assert "eval.policy" not in text  # `prefopt eval`'s keys are in its help, not train's
    assert len(text.splitlines()) < 120


def helped_values(group: str, option: str) -> dict[str, object]:
    """{key below the group: value} as `--help GROUP=OPTION` shows them, read as YAML values."""
    keys = option_keys(group, option, group).values()
    return {key.name.removeprefix(f"{group}."): yaml.safe_load(key.value) for key in keys if key.value}


@pytest.mark.parametrize("option", group_options("loss"))
def test_a_loss_options_help_keys_are_what_hydra_composes(option):
    composed = OmegaConf.to_container(compose_config([f"loss={option}"]).loss)
    assert helped_values("loss", option) == leaves(composed)


def test_a_model_options_help_keys_are_what_hydra_composes():
    composed = leaves(OmegaConf.to_container(compose_config(["model=tiny_llama"]).model))
    # the schema adds keys no line of tiny_llama.yaml sets (model.arch.*)
    assert helped_values("model", "tiny_llama").items() <= composed.items()


def test_group_and_section_help():
    loss = help_text("train", "train", "config", "loss")
    for option in group_options("loss"):
        description = read_config_file(CONF / "loss" / f"{option}.yaml").description
        assert f"  {option}" in loss and description[:40] in loss
    assert "loss.beta=0.1" in loss and "(default)" in loss
    assert "loss.gate.kind=q10" in help_text("train", "train", "config", "loss=gate_dpo_q10")
    wandb = help_text("train", "train", "config", "logger.wandb")
    assert "logger.wandb.mode=offline" in wandb and "logger.console" not in wandb
    with pytest.raises(ConfigError, match="did you mean trainer"):
        help_text("train", "train", "config", "trainr")
    with pytest.raises(ConfigError, match="did you mean gate_dpo"):
        help_text("train", "train", "config", "loss=gate_dpoo")
    assert "experiment" in GROUP_DIRS and "squeeze_demo" in help_text("train", "train", "config", "experiment")


def test_toy_and_eval_help():
    toy = help_text("toy", "the softmax toy", "toy", None)
    assert "GROUP=OPTION" not in toy and "  lr=2.0" in toy
    assert "eval.policy=null" in help_text("eval", "evaluate", "config", None)


# ---- did you mean -------------------------------------------------------------------------------------------------


def composition_error(overrides: list[str]) -> Exception:
    register_schema()
    with initialize_config_module(config_module="prefopt.conf", version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as error:
            compose(config_name="config", overrides=overrides)
    return error.value


@pytest.mark.parametrize(
    "override, line",
    [
        ("trainer.lrr=1e-5", "trainer.lrr is not a config key (did you mean trainer.lr?)"),
        ("loss.betaa=0.1", "loss.betaa is not a config key (did you mean loss.beta?)"),
        ("trainer.beta=0.1", "trainer.beta is not a config key (did you mean loss.beta?)"),  # the wrong section
        ("model.lor.r=4", "model.lor is not a config key (did you mean model.lora?)"),
        ("model.lora.zzz=1", "model.lora.zzz is not a config key (the keys there: model.lora.enabled, model.lora.r,"),
        ("trainer.zzzzzz=1", "trainer.zzzzzz is not a config key (no key is close)"),
    ],
)
def test_an_unknown_key_names_the_closest_keys(override, line):
    assert unknown_key_line(composition_error([override]), "train").startswith(line)


def test_an_unknown_option_names_the_closest_options():
    error = composition_error(["loss=gate_dpoo"])
    assert isinstance(error, MissingConfigException)
    assert unknown_option_line(error) == "loss=gate_dpoo is not an option of loss (did you mean gate_dpo?)"
    listed = unknown_option_line(composition_error(["model=gpt5"]))
    assert listed == f"model=gpt5 is not an option of model (the choices: {', '.join(group_options('model'))})"
    assert unknown_key_line(composition_error(["trainer=fast"]), "train") is None  # another error: Hydra's own


def test_did_you_mean_offers_only_the_nearly_closest():
    assert did_you_mean("gate_dpoo", group_options("loss")) == "did you mean gate_dpo?"
    assert did_you_mean("xyz", ["a", "b"]) == "the choices: a, b"


# ---- shell completion ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_installed_bash_completion_offers_every_subcommand_and_train_overrides(tmp_path):
    """The script `prefopt --shell-completion install=bash` prints, sourced in bash and called as on <TAB>."""
    shim = tmp_path / "bin" / "prefopt"  # `prefopt` on PATH, this checkout's
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\ncd {REPO} && exec {sys.executable} -m prefopt.cli "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"}
    install = subprocess.run(
        ["prefopt", "--shell-completion", "install=bash"], capture_output=True, text=True, env=env, timeout=120
    )
    assert install.returncode == 0 and "-F hydra_bash_completion prefopt" in install.stdout
    (tmp_path / "complete.sh").write_text(install.stdout)

    def complete(line: str) -> set[str]:
        words = line.split(" ")
        script = (
            f"source {tmp_path / 'complete.sh'}; COMP_LINE='{line}'; COMP_POINT={len(line)}; "
            f"COMP_WORDS=({' '.join(repr(word) for word in words)}); COMP_CWORD={len(words) - 1}; "
            'hydra_bash_completion; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        return set(result.stdout.split())

    assert complete("prefopt ") == set(COMMANDS)
    assert complete("prefopt re") == {"report"}
    assert {"loss=gate_dpo", "loss=gate_lpo", "loss=gate_ipo"} <= complete("prefopt train loss=gate_")
