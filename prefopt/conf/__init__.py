"""The config groups (YAML) that Hydra composes: `pkg://prefopt.conf` (conf/ at the repository root links here)."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent
