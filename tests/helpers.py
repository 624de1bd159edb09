"""Shared test helpers: run `prefopt train` in-process, read a W&B offline run back, and build one group's config node
for a test of one layer (the schema gives types; the values come from conf/, as `prefopt train` takes them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prefopt.cli import main
from prefopt.conf import CONF_DIR
from prefopt.run.config import DatasetConfig, HardwareConfig, ModelConfig, TrainerConfig

GROUP_SCHEMAS = {"model": ModelConfig, "dataset": DatasetConfig, "hardware": HardwareConfig}


def preset(group: str, option: str, **values: Any) -> DictConfig:
    """The `group` node (model, dataset, hardware) as `prefopt train group=option` sets it: the schema's types,
    conf/<group>/<option>.yaml's values, conf/config.yaml's keys of that group (dataset.max_completion_length, ...;
    an interpolation such as dataset.cache_dir's needs a value in `values` before it is read), then `values`."""
    shared = OmegaConf.load(CONF_DIR / "config.yaml").get(group, {})
    return OmegaConf.merge(
        OmegaConf.structured(GROUP_SCHEMAS[group]), OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), shared, values
    )


def trainer_node(**values: Any) -> DictConfig:
    """The trainer node of the default config (conf/config.yaml's trainer section), `values` on top."""
    defaults = OmegaConf.load(CONF_DIR / "config.yaml").trainer
    return OmegaConf.merge(OmegaConf.structured(TrainerConfig), defaults, values)


# The dataset settings the data tests were written against, unless a test sets its own: layout and template found
# automatically, a split named test held out, 512 / 256 tokens (no completion limit, prompts keep their end, a
# truncation warning past 10%), bad rows refused, the user's tokenized-pairs cache.
# Test inputs, not defaults: `prefopt train` takes its values from conf/dataset/<option>.yaml (preset("dataset", ...)).
DATA_TEST_SETTINGS = dict(
    name="arith",
    path=None,
    format="auto",
    chat_template="auto",
    train_split="train",
    eval_split="test",
    max_length=512,
    max_prompt_length=256,
    max_completion_length=None,
    truncation_mode="keep_end",
    warn_truncated_share=0.1,
    on_bad_row="error",
    cache_dir="${oc.env:PREFOPT_CACHE,${oc.env:HOME}/.cache/prefopt}/tokenized",
)


def dataset_node(**values: Any) -> DictConfig:
    """A dataset node for a data test: DATA_TEST_SETTINGS, then `values` (nested ones, arith= and columns=, merge)."""
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig), DATA_TEST_SETTINGS, values)


def run_train(run_dir: Path, *overrides: str) -> Path:
    """`prefopt train OVERRIDES hydra.run.dir=RUN_DIR` in this process; returns the run dir."""
    argv = sys.argv
    try:
        assert main(["train", *overrides, f"hydra.run.dir={run_dir}"]) == 0
    finally:
        sys.argv = argv
    return Path(run_dir)


def command_fails(capsys, command: str, run_dir: Path, *overrides: str) -> tuple[int, str]:
    """`prefopt COMMAND OVERRIDES hydra.run.dir=RUN_DIR` in this process, expected to exit: (exit code, stderr)."""
    import pytest

    argv = sys.argv
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([command, *overrides, f"hydra.run.dir={run_dir}"])
    finally:
        sys.argv = argv
    return exit_info.value.code, capsys.readouterr().err


def run_sweep(sweep_dir: Path, *overrides: str) -> list[Path]:
    """`prefopt train -m ...` (Hydra's basic launcher, jobs run one after another in this process)."""
    argv = sys.argv
    try:
        assert main(["train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]) == 0
    finally:
        sys.argv = argv
    return sorted(
        (path for path in Path(sweep_dir).iterdir() if path.is_dir() and path.name.isdigit()), key=lambda p: int(p.name)
    )


def read_wandb_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """(summary record, history items) of the offline W&B run in run_dir, decoded by wandb's own reader."""
    [wandb_dir] = list((Path(run_dir) / "wandb").glob("offline-run-*"))
    wandb_cli = [sys.executable, "-m", "wandb", "leet", "inspect", "--json"]
    summary = json.loads(
        subprocess.run([*wandb_cli, "--summary", str(wandb_dir)], capture_output=True, text=True, check=True).stdout
    )
    records = subprocess.run(
        [*wandb_cli, str(wandb_dir)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    history = [json.loads(line)["history"]["item"] for line in records if '"type":"history"' in line]
    return summary, history


def wandb_history_segments(run_dir: Path) -> list[list[dict]]:
    """Every history row of each W&B segment (offline-run dir) of a run dir, one list per segment in the order they
    were started, read from the .wandb files as far as each is intact: a resumed run has one segment per start."""
    from wandb.proto import wandb_internal_pb2

    from prefopt.observe.tracking import wandb_records

    segments = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        rows = []
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
        segments.append(rows)
    return segments


def wandb_history_all_segments(run_dir: Path) -> list[dict]:
    """The rows of every segment (wandb_history_segments), one after another: synced together they are the run."""
    return [row for rows in wandb_history_segments(run_dir) for row in rows]


def tiny_byte_llama(tokenizer, seed: int = 0, tie_word_embeddings: bool = True):
    """The tiny random Llama the unit tests score with: 2 layers of width 32 over the tokenizer's vocabulary,
    its weights drawn after torch.manual_seed(seed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
