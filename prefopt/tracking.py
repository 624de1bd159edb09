"""Where metrics go: metrics.jsonl in the run dir (one line per logged step) and W&B.

W&B runs offline by default (no account). Its run id is kept in the run dir so a resumed run
continues the same W&B run. On resume, metric lines after the checkpoint's step are dropped, so the
file reads as if the run had never stopped.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from prefopt.fileutil import atomic_write_json, atomic_write_text

log = logging.getLogger("prefopt")

METRICS_FILE = "metrics.jsonl"
DYNAMICS_FILE = "dynamics.jsonl"
SUMMARY_FILE = "summary.json"
WANDB_ID_FILE = "wandb_run_id"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Tracker:
    """Only rank 0 writes (enabled=True); on other ranks every method does nothing."""

    def __init__(self, cfg: DictConfig, run_dir: Path, resume_step: int = 0, enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled
        self.wandb_run = None
        if not enabled:
            return
        for path in (run_dir / METRICS_FILE, run_dir / DYNAMICS_FILE):
            if resume_step:
                kept = [row for row in read_jsonl(path) if row.get("step", 0) <= resume_step]
                atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
            elif path.exists():
                path.unlink()  # a fresh run in a reused dir starts fresh files
        self.wandb_run = self._start_wandb(cfg, resume=bool(resume_step))

    def _start_wandb(self, cfg: DictConfig, resume: bool):
        wandb_cfg = cfg.logger.wandb
        if wandb_cfg.mode == "disabled":
            return None
        import wandb

        id_path = self.run_dir / WANDB_ID_FILE
        run_id = id_path.read_text().strip() if resume and id_path.exists() else uuid.uuid4().hex[:12]
        atomic_write_text(id_path, run_id + "\n")
        run = wandb.init(
            project=wandb_cfg.project,
            entity=wandb_cfg.entity,
            group=wandb_cfg.group,
            name=wandb_cfg.name or self.run_dir.name,
            tags=list(wandb_cfg.tags),
            mode=wandb_cfg.mode,
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True),
        )
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    def log(self, step: int, metrics: Mapping[str, Any], file: str = METRICS_FILE) -> None:
        """One JSON line in run_dir/file (metrics.jsonl or dynamics.jsonl) and the same keys to W&B."""
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        with open(self.run_dir / file, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(row)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=columns, data=rows)})

    def finish(self, summary: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        atomic_write_json(self.run_dir / SUMMARY_FILE, dict(summary))
        if self.wandb_run is not None:
            for key, value in summary.items():
                self.wandb_run.summary[key] = value
            self.wandb_run.finish()
            self.wandb_run = None

    def close(self) -> None:
        """Finish W&B without a summary (on failure), so the next run in this process starts clean."""
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1)
            self.wandb_run = None
