"""`prefopt export RUN_DIR [-o OUT_DIR]`: the run's latest policy as one plain HF model directory.

A LoRA run's checkpoints hold adapters only; export loads the base model named in the run's frozen
config, applies the adapters and merges them into the weights. A full fine-tune is copied as is.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from prefopt.checkpoint import find_checkpoint
from prefopt.errors import ConfigError
from prefopt.engine import is_adapter_dir


def export_policy(run_dir: Path, output_dir: Path) -> Path:
    checkpoint = find_checkpoint(str(run_dir), run_dir, key="RUN_DIR")
    policy_dir = checkpoint / "policy"
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
    try:
        if is_adapter_dir(policy_dir):
            from peft import PeftModel

            from prefopt.models import load_model, load_tokenizer, resolve_model_source
            from prefopt.worker import load_frozen_config

            cfg = load_frozen_config(run_dir / "config.yaml")
            source = resolve_model_source(cfg.model)
            tokenizer = load_tokenizer(cfg.model, source)
            base = load_model(cfg.model, source, len(tokenizer), cfg.trainer.seed)
            merged = PeftModel.from_pretrained(base, policy_dir).merge_and_unload()
            merged.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        else:
            shutil.copytree(policy_dir, staging, dirs_exist_ok=True)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.replace(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def export_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="prefopt export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run dir with checkpoints/")
    parser.add_argument("-o", "--output", type=Path, default=None, help="output dir (default RUN_DIR/exported)")
    args = parser.parse_args(argv)
    try:
        output = export_policy(args.run_dir, args.output or args.run_dir / "exported")
    except ConfigError as error:
        print(f"prefopt: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {output}")
    return 0
