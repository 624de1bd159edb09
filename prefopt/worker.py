"""Worker side: read the frozen config of a run dir and train. Never composes with Hydra.

    python -m prefopt.worker RUN_DIR/config.yaml [--local_rank=N]

The DeepSpeed launcher appends --local_rank; ranks come from the environment, so it is ignored.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from prefopt.config import Config


def load_frozen_config(config_path: str | Path):
    """The resolved config.yaml of a run dir, typed again by the schema."""
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config_path))


def run_worker(config_path: str | Path) -> dict[str, Any]:
    from prefopt.trainer import train

    cfg = load_frozen_config(config_path)
    return train(cfg, Path(cfg.run_dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prefopt-worker", description=__doc__)
    parser.add_argument("config", help="a run dir's config.yaml")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="ignored (ranks come from the environment)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    run_worker(args.config)


if __name__ == "__main__":
    main()
