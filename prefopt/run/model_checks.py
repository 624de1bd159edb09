"""The model group's checks in the parent, before anything loads: which model.path a preset's source accepts, and
model.lora.target_modules's two forms. A path given where the preset would not load it is refused, never ignored:
the run, its caches and its model card would otherwise name a model that is not the one trained."""

from __future__ import annotations

import os

from omegaconf import DictConfig, ListConfig

from prefopt.core.errors import ConfigError
from prefopt.model.loading import names_local_path

OWN_MODEL = "use model=hf model.path=DIR to train a model of your own (a local HF directory: config.json + weights)"


def check_model_config(model_cfg: DictConfig) -> None:
    check_model_path(model_cfg)
    check_target_modules(model_cfg.lora.target_modules)


def check_model_path(model_cfg: DictConfig) -> None:
    source, path = model_cfg.source, model_cfg.path
    if source == "hub" and not path:
        raise ConfigError("model.path is empty: give a hub id or a local directory (model.path=/path/to/model)")
    if source == "tiny" and path:
        raise ConfigError(
            f"model.path={path} is not used by model={model_cfg.name} (source=tiny: random weights); {OWN_MODEL}"
        )
    if source == "gguf_package":
        if not (model_cfg.gguf_package and model_cfg.gguf_file):
            raise ConfigError("model.source=gguf_package needs model.gguf_package and model.gguf_file")
        if path and names_local_path(os.path.expanduser(path)):
            raise ConfigError(
                f"model.path={path} is not loaded by model={model_cfg.name} (it loads the GGUF {model_cfg.gguf_file} "
                f"of the package {model_cfg.gguf_package}); {OWN_MODEL}"
            )
    if source == "local":
        check_local_directory(path)


def check_local_directory(path) -> None:
    """model=hf: a local directory holding a saved HF model."""
    if not path:
        raise ConfigError(
            "model.path is not set: model=hf trains the HF causal LM in a local directory; give it with "
            "model.path=/path/to/model (config.json + weights)"
        )
    directory = os.path.expanduser(str(path))
    if not os.path.isdir(directory):
        raise ConfigError(
            f"model.path={path} is not a directory; model=hf needs a local HF model directory (config.json + weights, "
            "e.g. from save_pretrained or `hf download ORG/NAME --local-dir DIR`)"
        )
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ConfigError(
            f"model.path={path} has no config.json: not a saved HF model; point it at the directory save_pretrained "
            "wrote (config.json + weights)"
        )


def check_target_modules(target_modules) -> None:
    """A list of module names, or PEFT's all-linear (a string is taken whole: PEFT would read any other as a regex)."""
    if target_modules == "all-linear":
        return
    if (
        isinstance(target_modules, (list, ListConfig))
        and target_modules
        and all(isinstance(name, str) and name for name in target_modules)
    ):
        return
    raise ConfigError(
        f"model.lora.target_modules={target_modules!r} must be all-linear (every linear layer but the output head) or "
        "a list of module names, e.g. [q_proj,v_proj]"
    )
