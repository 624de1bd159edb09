"""How a model is named where a user reads it: the log line of the weights a run trains, messages, and the model
card. A local directory is named by itself and its own config.json, never by the preset that pointed at it (model=hf
would otherwise be "hf", and a preset's local copy would carry the preset's claim)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from prefopt.model.loading import ModelSource, local_location, lora_targets
from prefopt.model.quantization import parameter_count


def model_name(model_cfg: DictConfig) -> str:
    """How messages name the model: a local directory by its own name (any preset may point at one), else the
    preset's name."""
    path = os.path.expanduser(model_cfg.path or "")
    if model_cfg.source in ("hub", "local") and os.path.isdir(path):
        return Path(path).resolve().name
    return model_cfg.name


def directory_config(path: Optional[str]) -> dict:
    """A local model directory's config.json as a dict ({} when path is not such a directory or it is unreadable)."""
    if not path:
        return {}
    try:
        config = json.loads((Path(os.path.expanduser(path)) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def directory_model_text(path: str) -> Optional[str]:
    """What a local model directory holds, in its own config.json's words: the directory's name, its architecture
    and model_type, and the name it was saved from (`_name_or_path`, when that is not the directory itself). None when
    path is not a local model directory."""
    config = directory_config(path)
    if not config:
        return None
    architecture = ", ".join(config.get("architectures") or []) or "architecture not named"
    details = [architecture]
    if config.get("model_type"):
        details.append(f"model_type {config['model_type']}")
    origin = config.get("_name_or_path")
    if origin and os.path.abspath(os.path.expanduser(str(origin))) != os.path.abspath(os.path.expanduser(path)):
        details.append(f"saved from {origin}")
    name = Path(os.path.expanduser(path)).resolve().name
    return f"`{name}` ({'; '.join(details)}) at {path}"


def human_count(count: int) -> str:
    """134515008 -> 134.5M."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.{1 if count >= 100 * scale else 2}f}{suffix}"
    return str(count)


def loaded_model_line(model, model_cfg: DictConfig, source: ModelSource, fingerprint: Optional[str]) -> str:
    """The log line that says which weights a run trains: where they came from, their digest's prefix (the reference
    cache's fingerprint), parameter count, compute dtype, quantization, and with LoRA the trainable count and share.
    `model` is the policy as it trains (LoRA applied)."""
    where = {"tiny": f"{model_cfg.name} (random, seed-built)", "gguf": local_location(model_cfg, source)}.get(
        source.kind, source.location
    )
    digest = "" if fingerprint is None else f" ({'sha ' + fingerprint[:8] if source.kind != 'tiny' else fingerprint})"
    lora_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    base = sum(parameter_count(p) for name, p in model.named_parameters() if not any(n in name for n in lora_names))
    quantization = model_cfg.get("quantization")
    weights = model_cfg.dtype + (f", base weights {quantization}" if quantization else "")
    line = f"model: {where}{digest} {human_count(base)} params {weights}"
    if model_cfg.lora.enabled:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(parameter_count(p) for p in model.parameters())
        targets = lora_targets(model_cfg.lora.target_modules)
        line += (
            f"; LoRA r={model_cfg.lora.r} on {targets if isinstance(targets, str) else ','.join(targets)}: "
            f"{human_count(trainable)} trainable ({100 * trainable / total:.2f}% of {human_count(total)})"
        )
    return line
