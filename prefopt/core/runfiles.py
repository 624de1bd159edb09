"""Every file name of a run dir, in one place: what a run writes, what resume, report, export and the
launchers read. A name used by two modules is imported from here, never spelled again.

    RUN_DIR/
      config.yaml            the frozen, resolved config (CONFIG_FILE); each checkpoint holds a copy
      metrics.jsonl          one line per logged step (METRICS_FILE); dynamics.jsonl, generations.jsonl beside it
      summary.json           written once, at the end (SUMMARY_FILE)
      data.json              what the run trained on (DATA_FILE)
      checkpoints/step-N/    trainer_state.pt, manifest.json, config.yaml, the engine's files (CHECKPOINTS)
      error.txt              rank 0's traceback (ERROR_FILE); error-rank<N>.txt for the others
      .hydra/hydra.yaml      Hydra's record of the job, with the config-group choices (HYDRA_RECORD)
      wandb/                 the offline W&B run; wandb_run_id names it
"""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.yaml"  # the run's frozen config; also the config a checkpoint was saved under
METRICS_FILE = "metrics.jsonl"
DYNAMICS_FILE = "dynamics.jsonl"
GENERATIONS_FILE = "generations.jsonl"
SUMMARY_FILE = "summary.json"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "wandb_run_id"
HYDRA_DIR = ".hydra"
HYDRA_RECORD = Path(HYDRA_DIR) / "hydra.yaml"  # Hydra's record of the job: the config-group choices
HYDRA_OVERRIDES = Path(HYDRA_DIR) / "overrides.yaml"  # the job's command-line overrides
MULTIRUN_FILE = "multirun.yaml"  # Hydra's record of a sweep, in the sweep dir
DYNAMICS_PLOT = "dynamics.png"
TRAIN_LOG = "train.log"

CHECKPOINTS = "checkpoints"
CHECKPOINT_GLOB = "step-*"
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
RETIRED_SUFFIX = ".retired"  # checkpoints/.step-N.retired: the complete step-N while a new save of step N replaces it

ERROR_FILE = "error.txt"  # rank 0's traceback; other ranks write error-rank<N>.txt
ERROR_GLOB = "error*.txt"  # every rank's
EXIT_REPORT = ".rank{rank}.exit.json"  # a rank of `prefopt train`: how it ended, read (and removed) by the parent

LOCK_FILE = ".prefopt.lock"  # the run dir's owner
RANKS_LOCK_FILE = ".prefopt.ranks.lock"  # shared by every live rank of the run dir's launch
RANKS_FILE = "ranks.json"  # which host runs which rank
DATA_FILE = "data.json"  # what the run trained on (data/identity.py)
PREPARED_FILE = ".prepared"  # in a SLURM job dir: rank 0's verdict on the run dir, for the job's other tasks

RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)  # any of these (or a checkpoint) means the dir holds a run


def rank_error_file(rank: int) -> str:
    """The file a failed rank leaves its traceback in."""
    return ERROR_FILE if rank == 0 else ERROR_FILE.replace(".txt", f"-rank{rank}.txt")


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:06d}"
