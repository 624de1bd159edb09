"""Where metrics go: metrics.jsonl in the run dir (one line per logged step) and W&B.

W&B runs offline by default (no account), with system metrics (CPU, GPU, memory) and the console
output captured as W&B users expect (logger.wandb.system_metrics, logger.wandb.console). Its config is the
resolved run config plus the run's overrides, config-group choices and git revision. Its run id is kept
in the run dir so a resumed run continues the same W&B run (resume="allow"). On resume, metric lines after the
checkpoint's step are dropped, so the file reads as if the run had never stopped, and the steps that no earlier
W&B segment holds (a segment killed with SIGKILL keeps nothing it had buffered) are replayed from metrics.jsonl
into the new segment: synced together, the segments hold every step once.

Everything written is strict JSON: a non-finite value is written as null and its key listed under
"nonfinite" (a bare NaN is not JSON). A torn last line (power cut mid-write) is dropped on read.

Generations (greedy answers at evals, probe generations) go to generations.jsonl, one line per row with
its step and table; W&B gets one table per kind (`eval/generations`, `dynamics/generations`) with a step
column, re-logged whole under that one key at each eval (rebuilt from the file on resume), so the latest
version holds every step's rows. The probes' top gainers are such a table too, in their own file
(top_gainers.jsonl); the probes' per-token rows (token_views.jsonl) go to their file only: too many for W&B.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from prefopt.core.fileutil import atomic_write_json, atomic_write_text, open_no_follow
from prefopt.core.runfiles import (
    DYNAMICS_FILE,
    GENERATIONS_FILE,
    GIT_REVISION_FILE,
    HYDRA_RECORD,
    METRICS_FILE,
    OVERRIDES_FILE,
    SUMMARY_FILE,
    TOKEN_VIEWS_FILE,
    TOP_GAINERS_FILE,
    WANDB_DIR,
    WANDB_ID_FILE,
)

log = logging.getLogger("prefopt")

TABLE_KEY = "table"  # the generations.jsonl field naming a row's table (its W&B key)
ROW_FILES = (METRICS_FILE, DYNAMICS_FILE, GENERATIONS_FILE, TOKEN_VIEWS_FILE, TOP_GAINERS_FILE)  # cut back on resume
TABLE_FILES = (GENERATIONS_FILE, TOP_GAINERS_FILE)  # rows of W&B tables (log_table), rebuilt on resume
FILE_ONLY = (TOKEN_VIEWS_FILE,)  # rows never sent to W&B (append_rows), so never replayed there
WANDB_BLOCK = 32 * 1024  # block size of W&B's record log


def append_no_follow(path: Path):
    """open(path, "a"), refusing a symbolic link (a dangling one would create a file outside the run dir)."""
    return os.fdopen(open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL file; a torn (unparseable) *last* line is dropped with a warning, a bad line
    anywhere else is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                log.warning(
                    "%s: dropping a torn last line (%d characters), written when the run was cut off", path, len(line)
                )
                break
            raise ValueError(f"{path}, line {number}: not JSON; the file is damaged") from None
    return rows


def strict_json_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Non-finite floats become null, and their keys are listed under "nonfinite"."""
    clean: dict[str, Any] = {}
    nonfinite = []
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            clean[key] = None
            nonfinite.append(key)
        else:
            clean[key] = value
    if nonfinite:
        clean["nonfinite"] = nonfinite
    return clean


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a W&B `.wandb` file (a LevelDB-style log: a 7-byte header, then 32 KiB blocks of
    records, each with a 7-byte header: checksum, length, type FULL/FIRST/MIDDLE/LAST), up to where the
    file is torn. Read here because wandb 0.31 ships no Python reader for its own files."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        return
    position, pending = 7, b""
    while position + 7 <= len(data):
        left_in_block = WANDB_BLOCK - position % WANDB_BLOCK
        if left_in_block < 7:  # a block's tail too short for a header is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        end = position + 7 + length
        if kind not in (1, 2, 3, 4) or end > len(data):
            return  # padding at the end, or a torn record
        chunk, position = data[position + 7 : end], end
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            yield pending + chunk
            pending = b""


def wandb_logged_steps(run_dir: Path, run_id: str) -> set[int]:
    """The `step` values of every history record in this run id's W&B segments (offline files), read as
    far as each file is intact (a killed segment's file may be empty or end mid-record)."""
    from wandb.proto import wandb_internal_pb2

    steps: set[int] = set()
    for path in sorted((run_dir / WANDB_DIR).glob(f"*run-*-{run_id}/run-{run_id}.wandb")):
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(data)
            except Exception:  # a damaged record: what was read before it counts
                break
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    if item.key == "step" or list(item.nested_key) == ["step"]:
                        steps.add(int(json.loads(item.value_json)))
    return steps


def wandb_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A strict row for W&B: null values (non-finite ones) are left out, the flag list too."""
    return {key: value for key, value in row.items() if value is not None and key != "nonfinite"}


class Tracker:
    """Only rank 0 writes (enabled=True); on other ranks every method does nothing."""

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        resume_step: int = 0,
        enabled: bool = True,
        resume_rows: Optional[Mapping[str, int]] = None,
    ):
        """resume_rows: how many lines each file had when the checkpoint was written (rows_written() then);
        on resume each file is cut back to exactly that (rows logged after the checkpoint, such as a final
        eval at the checkpoint's own step, are dropped). Without it, rows up to resume_step are kept."""
        self.run_dir = run_dir
        self.enabled = enabled
        self.wandb_run = None
        self.rows = dict.fromkeys(ROW_FILES, 0)  # lines in each file, for the checkpoint (see resume_rows)
        self.tables: dict[str, list[dict[str, Any]]] = {}  # W&B table key -> its rows so far (TABLE_FILES lines)
        if not enabled:
            return
        kept_rows = {}
        for path in (run_dir / name for name in ROW_FILES):
            if resume_step:
                rows = read_jsonl(path)
                if resume_rows is not None and path.name in resume_rows:
                    kept_rows[path.name] = rows[: resume_rows[path.name]]
                else:
                    kept_rows[path.name] = [row for row in rows if row.get("step", 0) <= resume_step]
                atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept_rows[path.name]))
            elif path.exists():
                path.unlink()  # a fresh run (launch.py refuses a dir that holds one it did not checkpoint)
        self.rows |= {name: len(rows) for name, rows in kept_rows.items()}
        for row in (row for name in TABLE_FILES for row in kept_rows.pop(name, [])):
            self.tables.setdefault(row[TABLE_KEY], []).append(row)
        for name in FILE_ONLY:
            kept_rows.pop(name, None)
        self.wandb_run = self._start_wandb(cfg, resume=bool(resume_step))
        if self.wandb_run is not None and resume_step:
            self._replay_missing(kept_rows)

    def _replay_missing(self, kept_rows: dict[str, list[dict]]) -> None:
        """Log the steps up to the checkpoint that no earlier W&B segment of this run holds."""
        present = wandb_logged_steps(self.run_dir, self.wandb_run.id)
        missing = [row for rows in kept_rows.values() for row in rows if row.get("step", 0) not in present]
        for row in sorted(missing, key=lambda row: row.get("step", 0)):
            self.wandb_run.log(wandb_row(row))
        if missing:
            log.info(
                "W&B: replayed %d rows (steps an earlier, interrupted segment did not keep) from the run dir",
                len(missing),
            )

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
            config=OmegaConf.to_container(cfg, resolve=True) | {"run": run_provenance(self.run_dir)},
            settings=wandb.Settings(
                console=wandb_cfg.console,
                quiet=True,
                x_disable_stats=not wandb_cfg.system_metrics,
                x_stats_sampling_interval=wandb_cfg.system_sample_seconds,
            ),
        )
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    def log(self, step: int, metrics: Mapping[str, Any], file: str = METRICS_FILE) -> None:
        """One JSON line in run_dir/file (metrics.jsonl or dynamics.jsonl) and the same keys to W&B."""
        if not self.enabled:
            return
        row = strict_json_row({"step": step, **metrics})
        with append_no_follow(self.run_dir / file) as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
        self.rows[file] = self.rows.get(file, 0) + 1
        if self.wandb_run is not None:
            self.wandb_run.log(wandb_row(row))

    def append_rows(self, file: str, rows: list[Mapping[str, Any]]) -> None:
        """Rows (each with its step) as JSON lines in run_dir/file, and nowhere else (token_views.jsonl)."""
        if not self.enabled:
            return
        with append_no_follow(self.run_dir / file) as handle:
            handle.writelines(json.dumps(strict_json_row(row), allow_nan=False) + "\n" for row in rows)
        self.rows[file] = self.rows.get(file, 0) + len(rows)

    def log_table(
        self, key: str, step: int, columns: list[str], rows: list[list[Any]], file: str = GENERATIONS_FILE
    ) -> None:
        """Add `rows` (values in `columns` order) at `step` to table `key`: lines in `file` (one of TABLE_FILES),
        and the whole table so far (a step column first) re-logged to W&B under `key`."""
        if not self.enabled:
            return
        new_rows = [{TABLE_KEY: key, "step": step, **dict(zip(columns, values))} for values in rows]
        self.append_rows(file, new_rows)
        table = self.tables.setdefault(key, [])
        table.extend(new_rows)
        if self.wandb_run is not None:
            import wandb

            all_columns = ["step", *columns]
            self.wandb_run.log(
                {
                    key: wandb.Table(
                        columns=all_columns, data=[[row.get(column) for column in all_columns] for row in table]
                    )
                }
            )

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (level WARN): e-mail or Slack where the account has alerts on. An offline run keeps it as a
        record of its run file, with no network call."""
        if self.enabled and self.wandb_run is not None:
            self.wandb_run.alert(title=title, text=text, level="WARN")

    def finish(self, summary: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        summary = strict_json_row(summary)
        atomic_write_json(self.run_dir / SUMMARY_FILE, summary)
        if self.wandb_run is not None:
            for key, value in wandb_row(summary).items():
                self.wandb_run.summary[key] = value
            self.wandb_run.finish()
            self.wandb_run = None

    def close(self) -> None:
        """Finish W&B without a summary (on failure), so the next run in this process starts clean."""
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1)
            self.wandb_run = None


def run_provenance(run_dir: Path) -> dict[str, Any]:
    """What the resolved config does not say about how the run was made, for W&B's config: the command-line
    overrides (overrides.yaml), Hydra's config-group choices (`loss: gate_dpo`, where the config only has
    loss.name=dpo) and the git revision; each left out when its file is absent."""
    provenance: dict[str, Any] = {}
    if (run_dir / OVERRIDES_FILE).is_file():
        provenance["overrides"] = [str(item) for item in OmegaConf.load(run_dir / OVERRIDES_FILE)]
    if (run_dir / HYDRA_RECORD).is_file():
        choices = OmegaConf.select(OmegaConf.load(run_dir / HYDRA_RECORD), "hydra.runtime.choices")
        if choices is not None:
            provenance["choices"] = {
                str(key): value
                for key, value in OmegaConf.to_container(choices).items()
                if not str(key).startswith("hydra/")
            }
    if (run_dir / GIT_REVISION_FILE).is_file():
        provenance["git_revision"] = (run_dir / GIT_REVISION_FILE).read_text().strip()
    return provenance
