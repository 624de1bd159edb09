"""Every file name of a run dir, in one place: what a run writes, what resume, report, export and the
launchers read. A name used by two modules is imported from here, never spelled again; a run dir's checkpoints
are listed by checkpoint_dirs, the one way.

    RUN_DIR/
      config.yaml            the frozen, resolved config (CONFIG_FILE); each checkpoint holds a copy
      overrides.yaml         the command line's overrides (OVERRIDES_FILE); git_revision beside it
      metrics.jsonl          one line per logged step (METRICS_FILE); dynamics.jsonl, generations.jsonl beside it
      token_views.jsonl      the probes' per-token log-probs (TOKEN_VIEWS_FILE); top_gainers.jsonl beside it
      summary.json           written once, at the end (SUMMARY_FILE)
      data.json              what the run trained on (DATA_FILE)
      ranks.json             which host runs which rank (RANKS_FILE)
      checkpoints/step-N/    policy/, engine_state.pt or deepspeed/, trainer_state.pt, config.yaml, manifest.json
      checkpoints/latest     the newest checkpoint's name (LATEST_FILE)
      error.txt              rank 0's traceback (ERROR_FILE); error-rank<N>.txt for the others
      .hydra/hydra.yaml      Hydra's record of the job, with the config-group choices (HYDRA_RECORD)
      wandb/                 the offline W&B run; wandb_run_id names it
      dynamics.png           the learning-dynamics plot (DYNAMICS_PLOT); train.log, the log
      plot.png               `prefopt plot RUN_DIR` without -o: training curves, and the probes' panels (PLOT_FILE)
      token_views/probe-0.png  one per-token heatmap per probe (TOKEN_VIEWS_DIR, token_view_plot)
    SWEEP_DIR/
      multirun.yaml          Hydra's record of the sweep (MULTIRUN_FILE); 0/, 1/, ... its jobs' run dirs
      report.md, .csv, .png  `prefopt report`; report_groups.md/.csv and report_bands.png with --group-by
                             report_fit.csv and report_fit.png with --fit KEY (its section in report_groups.md)
"""

from __future__ import annotations

import re
from pathlib import Path

# ---- a run dir
CONFIG_FILE = "config.yaml"  # the run's frozen config; also the config a checkpoint was saved under
OVERRIDES_FILE = "overrides.yaml"  # the command line's overrides, as `prefopt train` recorded them
GIT_REVISION_FILE = "git_revision"  # the prefopt checkout's git revision at launch
METRICS_FILE = "metrics.jsonl"
DYNAMICS_FILE = "dynamics.jsonl"
GENERATIONS_FILE = "generations.jsonl"
TOKEN_VIEWS_FILE = "token_views.jsonl"  # one line per (probe step, probe, chosen/rejected/greedy, position)
TOP_GAINERS_FILE = "top_gainers.jsonl"  # per probe step: the tokens whose probability rose most since step 0
SUMMARY_FILE = "summary.json"
EXPORT_DIR = "exported"  # `prefopt export RUN_DIR` without -o: the plain HF model dir
DATA_FILE = "data.json"  # what the run trained on (data/identity.py)
RANKS_FILE = "ranks.json"  # which host runs which rank
RANKS_FILE_LOCK = f".{RANKS_FILE}.lock"  # taken by each rank while it rewrites RANKS_FILE
WANDB_DIR = "wandb"
WANDB_ID_FILE = "wandb_run_id"
HYDRA_DIR = ".hydra"  # Hydra's job record (also the value of hydra.output_subdir)
HYDRA_CONFIG = Path(HYDRA_DIR) / "config.yaml"  # Hydra's copy of the composed task config
HYDRA_RECORD = Path(HYDRA_DIR) / "hydra.yaml"  # Hydra's record of the job: the config-group choices
HYDRA_OVERRIDES = Path(HYDRA_DIR) / "overrides.yaml"  # the job's command-line overrides, as Hydra recorded them
DYNAMICS_PLOT = "dynamics.png"
PLOT_FILE = "plot.png"  # `prefopt plot RUN_DIR ...` without -o, in the first run dir
TOKEN_VIEWS_DIR = "token_views"  # the per-token heatmaps, one PNG per probe (token_view_plot)
TRAIN_LOG = "train.log"  # the log, when Hydra's own file handler is not there to name it

ERROR_FILE = "error.txt"  # rank 0's traceback; other ranks write error-rank<N>.txt
ERROR_GLOB = "error*.txt"  # every rank's
EXIT_REPORT = ".rank{rank}.exit.json"  # a rank of `prefopt train`: how it ended, read (and removed) by the parent

LOCK_FILE = ".prefopt.lock"  # the run dir's owner
RANKS_LOCK_FILE = ".prefopt.ranks.lock"  # shared by every live rank of the run dir's launch

RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)  # any of these (or a checkpoint) means the dir holds a run
# beside config.yaml, any of these makes a dir a run's own dir (`prefopt report` on a folder of runs): a checkpoint
# holds a config.yaml too, but none of these; a run that failed after its launch has its overrides.yaml
RUN_DIR_MARKS = (METRICS_FILE, SUMMARY_FILE, OVERRIDES_FILE)

# ---- its checkpoints: RUN_DIR/checkpoints/step-000010/
CHECKPOINTS = "checkpoints"
CHECKPOINT_GLOB = "step-*"
LATEST_FILE = "latest"  # checkpoints/latest: the name of the newest checkpoint saved
STAGING_SUFFIX = ".partial"  # checkpoints/.step-N.partial: a save in progress, renamed to step-N once complete
RETIRED_SUFFIX = ".retired"  # checkpoints/.step-N.retired: the complete step-N while a new save of step N replaces it
POLICY_DIR = "policy"  # in a checkpoint: the policy in HF format (what eval and export load)
ENGINE_STATE = "engine_state.pt"  # in a checkpoint: the torch engine's optimizer and scheduler state
DEEPSPEED_TAG = "deepspeed"  # in a checkpoint: DeepSpeed's own checkpoint, saved under this tag (a subdir)
TRAINER_STATE = "trainer_state.pt"
REFERENCE_STATE = "reference_state.pt"  # in a checkpoint of a moving reference (reference.sync): its weights
MANIFEST = "manifest.json"  # every file of the checkpoint with size and SHA-256, written last

# ---- a sweep dir (Hydra's multirun dir)
MULTIRUN_FILE = "multirun.yaml"  # Hydra's record of a sweep, written before its first job: the overrides it sweeps
REPORT_MD = "report.md"  # `prefopt report`: one row per job
REPORT_CSV = "report.csv"
REPORT_PLOT = "report.png"
REPORT_GROUPS_MD = "report_groups.md"  # `prefopt report --group-by`: one row per group, over seeds
REPORT_GROUPS_CSV = "report_groups.csv"
REPORT_BANDS_PLOT = "report_bands.png"
REPORT_FIT_CSV = "report_fit.csv"  # `prefopt report --fit KEY`: the least-squares lines of the metrics on KEY
REPORT_FIT_PLOT = "report_fit.png"

# ---- a SLURM job dir
PREPARED_FILE = ".prepared"  # rank 0's verdict on the run dir, for the job's other tasks

# ---- `prefopt toy`'s output dir
INSPECTION_PARQUET = "inspection.parquet"  # `prefopt inspect`: one row per pair (train/inspection.py)
INSPECTION_CSV = "inspection.csv"  # the same table as CSV
INSPECTION_HISTOGRAMS = "inspection_histograms.png"
INSPECTION_SCATTER = "inspection_scatter.png"  # CHES against the gates (and the chosen change, with a policy)
INSPECTION_SUMMARY = "inspection.md"  # the console summary
TOY_PLOT = "toy_probabilities.png"
TOY_RESULTS = "toy_results.json"


def is_run_dir(directory: Path) -> bool:
    """A run's own dir (training or `prefopt eval`): its frozen config and what the run wrote beside it."""
    directory = Path(directory)
    return (directory / CONFIG_FILE).is_file() and any((directory / name).is_file() for name in RUN_DIR_MARKS)


def rank_error_file(rank: int) -> str:
    """The file a failed rank leaves its traceback in."""
    return ERROR_FILE if rank == 0 else ERROR_FILE.replace(".txt", f"-rank{rank}.txt")


def token_view_plot(probe: int) -> str:
    """The heatmap of probe `probe` (0-based, the probe set's order) in TOKEN_VIEWS_DIR."""
    return f"probe-{probe}.png"


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(directory: Path) -> int:
    """The step a checkpoint dir's name says (step-000010 and its retired copy .step-000010.retired -> 10; -1 when
    it says none)."""
    match = re.fullmatch(rf"\.?step-(\d+)(?:{re.escape(RETIRED_SUFFIX)})?", Path(directory).name)
    return int(match[1]) if match else -1


def staging_dir(target: Path) -> Path:
    """Where a save of the checkpoint `target` is built (checkpoints/.step-N.partial)."""
    return target.parent / f".{target.name}{STAGING_SUFFIX}"


def retired_dir(target: Path) -> Path:
    """Where the checkpoint `target` waits while a new save of its step replaces it (checkpoints/.step-N.retired)."""
    return target.parent / f".{target.name}{RETIRED_SUFFIX}"


def retired_target(retired: Path) -> Path:
    """The checkpoint a retired copy is of (.step-N.retired -> step-N)."""
    return retired.parent / retired.name[1 : -len(RETIRED_SUFFIX)]


def retired_copies(root: Path) -> list[Path]:
    """Every retired copy in a checkpoints dir, whether or not its checkpoint is back in place."""
    return list(Path(root).glob(f".{CHECKPOINT_GLOB}{RETIRED_SUFFIX}"))


def checkpoint_dirs(root: Path, retired: bool = False) -> list[Path]:
    """The checkpoints in a checkpoints dir (RUN_DIR/checkpoints), newest step first: the one way they are listed.
    A save in progress (.step-N.partial) is never one. With `retired`, a retired copy whose step-N is missing is
    listed too: it is that checkpoint (a save of step N was cut off mid-replace), to be read where it is."""
    root = Path(root)
    found = [path for path in root.glob(CHECKPOINT_GLOB) if not path.name.endswith(STAGING_SUFFIX)]
    if retired:
        found += [path for path in retired_copies(root) if not retired_target(path).exists()]
    return sorted(found, key=checkpoint_step, reverse=True)
