"""Parent side of `prefopt train`: validate, freeze the run dir, dispatch to the worker.

Runs inside the Hydra app, loads no model and touches no CUDA: a bad config or an unreachable model
fails here in seconds.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from prefopt.core import proctree, rundir
from prefopt.core.distributed import is_follower_host, torchrun_node_args, wait_for_frozen_config
from prefopt.core.errors import USER_ERRORS, ConfigError, Terminated, stop_exception
from prefopt.core.fileutil import atomic_write_text, clean_stale_temps
from prefopt.core.runfiles import (
    CHECKPOINTS,
    CONFIG_FILE,
    ERROR_GLOB,
    EXIT_REPORT,
    GIT_REVISION_FILE,
    HYDRA_CONFIG,
    HYDRA_DIR,
    HYDRA_OVERRIDES,
    HYDRA_RECORD,
    OVERRIDES_FILE,
    SUMMARY_FILE,
    TRAIN_LOG,
)
from prefopt.core.slurm import in_slurm_task, restart_count
from prefopt.model.loading import resolve_model_source
from prefopt.run.config import require_values, validate_config
from prefopt.run.hardware_plan import settle_hardware
from prefopt.run.resume import accept_resume, find_latest_run, no_checkpoint_error, search_roots
from prefopt.run.worker import run_worker
from prefopt.train.checkpoint import checkpoint_candidates, frozen_yaml, restore_retired, resume_mode

log = logging.getLogger("prefopt")


def git_revision() -> str:
    """The prefopt source revision (with '-dirty' for uncommitted changes), for reproducibility."""
    source_dir = Path(__file__).resolve().parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True, text=True, timeout=10
        )
        if revision.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source_dir,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return revision.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"


def resume_run_dir(resume: Any, hydra_dir: Path, cfg: Optional[DictConfig] = None) -> Path:
    """trainer.resume=PATH continues that run in its own dir, trainer.resume=latest the newest run with this
    config (prefopt/run/resume.py) in its; otherwise the run writes to Hydra's dir."""
    mode = resume_mode(resume)
    if mode == "latest":
        return find_latest_run(cfg, search_roots(hydra_dir), exclude=hydra_dir).run_dir
    if mode != "path":
        return hydra_dir
    path = Path(resume).expanduser().resolve()
    if (path / CHECKPOINTS).is_dir():
        return path
    if path.parent.name == CHECKPOINTS:
        return path.parent.parent
    raise ConfigError(f"trainer.resume={resume}: not a run dir (no {CHECKPOINTS}/ inside) nor a checkpoint dir")


def prepare_run(cfg: DictConfig, hydra_dir: Path, overrides: list[str]) -> Path:
    """Validate, settle hardware=auto, check the model can be found, and write the frozen config. Returns the run
    dir."""
    if cfg.get("run_dir") is not None:
        raise ConfigError(
            f"run_dir={cfg.run_dir}: run_dir is where prefopt records the dir a run wrote to, not a setting; choose "
            f"the dir with hydra.run.dir={cfg.run_dir} (a sweep: hydra.sweep.dir=...)"
        )
    require_values(cfg)
    deferred_record = (
        OmegaConf.to_yaml(cfg) if hydra_record_deferred() else None
    )  # as composed, before hardware=auto settles
    validate_config(cfg)
    if is_follower_host(
        cfg.hardware
    ):  # torchrun across hosts: node_rank 0 freezes and locks the run dir; this host waits for it
        return wait_for_frozen_config(resume_run_dir(cfg.trainer.resume, hydra_dir, cfg))
    settle_hardware(cfg)  # hardware=auto -> the preset that fits (or a refusal), before the model is even looked for
    resolve_model_source(cfg.model)
    run_dir = resume_run_dir(cfg.trainer.resume, hydra_dir, cfg)
    rundir.refuse_outside_links(run_dir)  # before the lock file is even opened
    rundir.acquire(run_dir)  # one owner per run dir, held until dispatch() returns
    try:
        # --- decide: nothing in the run dir is written until the run may use it (a refused resume leaves its record as
        # it was)
        mode = resume_mode(cfg.trainer.resume)
        if mode == "this" and restart_count() == 0 and not checkpoint_candidates(run_dir):
            raise no_checkpoint_error(run_dir, search_roots(hydra_dir), cfg)
        rundir.refuse_reuse(run_dir, mode != "off" or restart_count() > 0)
        # its config, its length (under trainer.num_epochs, on the data built once) and its data's identity
        accepted = accept_resume(cfg, run_dir) if mode != "off" else None
        # --- accepted: record this launch in the run dir
        restore_retired(run_dir / CHECKPOINTS)  # a checkpoint renamed aside by a save killed mid-replace, back in place
        if run_dir.resolve() != hydra_dir.resolve():
            follow_log(run_dir, hydra_dir)
        if accepted is not None and accepted.length_change:
            log.warning("%s", accepted.length_change)  # in the run dir's log; config.yaml records the new length
        for directory in (run_dir, run_dir / CHECKPOINTS):  # writes killed mid-way left their temporary files
            clean_stale_temps(directory)
        for stale in run_dir.glob(ERROR_GLOB):
            stale.unlink()  # an earlier attempt's failure, in a resumed or requeued run dir
        frozen = OmegaConf.to_container(cfg, resolve=True)
        frozen["run_dir"] = str(run_dir.resolve())
        atomic_write_text(run_dir / CONFIG_FILE, frozen_yaml(frozen))
        atomic_write_text(run_dir / OVERRIDES_FILE, OmegaConf.to_yaml(list(overrides)))
        atomic_write_text(run_dir / GIT_REVISION_FILE, git_revision() + "\n")
        if deferred_record is not None:
            write_hydra_record(deferred_record, hydra_dir, overrides)
    except BaseException:
        unfollow_log(run_dir)
        rundir.release(run_dir)
        raise
    return run_dir


DEFER_OVERRIDE = (
    "++hydra.output_subdir=null"  # how prefopt defers Hydra's record (a user would write hydra.output_subdir=null)
)


def defer_hydra_record(config: DictConfig) -> None:
    """Called by cli.CreateOutputDir before Hydra writes its job record (.hydra/) into a run dir that already has one
    (a resume, or a refused reuse): Hydra skips it (output_subdir=null) and prepare_run writes it once the run is
    accepted, so a refused launch leaves the earlier record intact."""
    if (Path(str(config.hydra.run.dir)) / HYDRA_DIR).is_dir() and config.hydra.output_subdir == HYDRA_DIR:
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.output_subdir = None
            config.hydra.overrides.hydra.append(
                DEFER_OVERRIDE
            )  # the mark: a user's own output_subdir=null is left alone


def defer_sweep_hydra_records(config: DictConfig) -> None:
    """The same for a sweep whose jobs may find runs in their dirs (trainer.resume set, or a sweep dir used before):
    every job's config is composed again from hydra.overrides.hydra, so the deferral goes there. Called before the
    sweep dir is created."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    reused = sweep_dir.is_dir() and any(sweep_dir.iterdir())
    if (reused or resume_mode(config.trainer.resume) != "off") and config.hydra.output_subdir == HYDRA_DIR:
        with read_write(config.hydra.overrides), open_dict(config.hydra.overrides):
            config.hydra.overrides.hydra.append(DEFER_OVERRIDE)


def hydra_record_deferred() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return (
        HydraConfig.initialized()
        and HydraConfig.get().output_subdir is None
        and DEFER_OVERRIDE in HydraConfig.get().overrides.hydra
    )


def write_hydra_record(task_yaml: str, hydra_dir: Path, overrides: list[str]) -> None:
    """What Hydra would have written to hydra_dir/.hydra (defer_hydra_record), now that the run is accepted."""
    from hydra.core.hydra_config import HydraConfig

    hydra_node = OmegaConf.create({"hydra": OmegaConf.to_container(HydraConfig.get(), resolve=False)})
    hydra_node.hydra.output_subdir = HYDRA_DIR
    hydra_node.hydra.overrides.hydra = [item for item in hydra_node.hydra.overrides.hydra if item != DEFER_OVERRIDE]
    atomic_write_text(hydra_dir / HYDRA_CONFIG, task_yaml)
    atomic_write_text(hydra_dir / HYDRA_RECORD, OmegaConf.to_yaml(hydra_node))
    atomic_write_text(hydra_dir / HYDRA_OVERRIDES, OmegaConf.to_yaml(list(overrides)))


_followed_logs: dict[Path, logging.Handler] = {}  # run dir -> the handler that appends this launch's log to it


def follow_log(run_dir: Path, hydra_dir: Path) -> None:
    """A run continued in another dir (trainer.resume=PATH or latest) logs there too, appended to its own
    log file (Hydra's is opened in this launch's new dir before any prefopt code runs)."""
    hydra_files = [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == hydra_dir.resolve()
    ]
    name = Path(hydra_files[0].baseFilename).name if hydra_files else TRAIN_LOG
    log.info("continuing the run in %s; this launch logs to %s", run_dir, run_dir / name)
    handler = logging.FileHandler(run_dir / name, mode="a")
    if hydra_files:
        handler.setFormatter(hydra_files[0].formatter)
        handler.setLevel(hydra_files[0].level)
    logging.getLogger().addHandler(handler)
    _followed_logs[run_dir] = handler


def unfollow_log(run_dir: Path) -> None:
    handler = _followed_logs.pop(run_dir, None)
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


class WorkerError(RuntimeError):
    """A worker failed; the message carries the failing rank's traceback."""


def dispatch(cfg: DictConfig, run_dir: Path, command: str = "train") -> dict[str, Any]:
    """Run the worker body (command: worker.WORKER_COMMANDS): in this process (inline, or as this SLURM task's rank)
    or as torchrun's workers. Releases the run dir's lock (taken by prepare_run) when the run ends, however it ends."""
    try:
        return _dispatch(cfg, run_dir, command)
    finally:
        unfollow_log(run_dir)
        rundir.release(run_dir)


def _dispatch(cfg: DictConfig, run_dir: Path, command: str) -> dict[str, Any]:

    if cfg.hardware.launcher == "slurm":
        if not in_slurm_task():
            log.warning(
                "hardware.launcher=slurm and this is not a SLURM task: nothing was trained. The run dir is frozen; "
                "train it with `sbatch scripts/slurm/train.sbatch %s` (or sweep with -m hydra/launcher=slurm)",
                run_dir,
            )
            return {}
        return run_worker(run_dir / CONFIG_FILE, command)  # ranks from SLURM's environment, no launcher inside the job
    if in_slurm_task() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        raise ConfigError(
            f"this SLURM job has {os.environ['SLURM_NTASKS']} tasks but hardware.launcher={cfg.hardware.launcher} "
            "would start every rank in each of them; use a slurm_* hardware preset (launcher: slurm)"
        )
    if cfg.hardware.launcher == "inline":
        return run_worker(run_dir / CONFIG_FILE, command)
    return run_torchrun(cfg, run_dir, command)


STOP_WAIT_S = 600.0  # ranks stopping at a checkpoint (Ctrl-C, SIGTERM here) are ended after this long; again: at once
LONE_STOP_WAIT_S = 10.0  # after a rank reported a stop, how long torchrun may take to exit before its ranks are ended


def run_torchrun(cfg: DictConfig, run_dir: Path, command_name: str = "train") -> dict[str, Any]:
    """torchrun's ranks on this host. They die with this process however it dies (prefopt/core/proctree.py); a
    rank's user error ends them all and is raised here as its one line; Ctrl-C or SIGTERM here stops them at a
    checkpoint."""
    import sys

    ranks = cfg.hardware.gpus_per_node
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        *torchrun_node_args(cfg.hardware),
        "-m",
        "prefopt.worker",
        str(run_dir / CONFIG_FILE),
        *(["--command", command_name] if command_name != "train" else []),
    ]
    launch = secrets.token_hex(8)  # the ranks stamp their exit reports with it: another launch's are never read here
    env = dict(os.environ)
    # a sweep's earlier in-process job left this process's W&B service address here: each rank starts its own, which
    # dies with it (a service outliving a killed rank would keep its run id "in use" and refuse the resume)
    env.pop("WANDB_SERVICE", None)
    env[proctree.LAUNCHER_ENV] = str(os.getpid())
    env[proctree.LAUNCH_ID_ENV] = launch
    if cfg.hardware.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(cfg.hardware.num_threads or max(1, (os.cpu_count() or 1) // ranks)))
    if not is_follower_host(cfg.hardware):
        # this process holds the run dir's lock, and no rank of this launch runs yet (another host's meet this one's
        # torchrun first): every report there is an earlier launch's, left by a parent that was killed
        remove_exit_reports(run_dir)
    log.info("launching %d ranks: %s", ranks, " ".join(command))
    # its own session (a Ctrl-C in the terminal reaches this process only), and it dies with this process
    process = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=proctree.die_with_parent_preexec())
    try:
        returncode = wait_for_ranks(process, run_dir, launch)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM (errors.Terminated) here: the ranks stop at a checkpoint
        stop_ranks(process, signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
        take_exit_reports(run_dir, launch)
        raise
    except BaseException:
        proctree.kill_tree(process)
        raise
    # torchrun has exited (or was ended by wait_for_ranks): what its ranks reported is raised outside the try above
    reports = take_exit_reports(run_dir, launch)
    raise_user_error(reports)
    stopped = [report["stopped"] for report in reports if "stopped" in report]
    if stopped:  # a rank was sent SIGTERM (or SIGINT) by someone else: the ranks stopped (at a checkpoint in the loop)
        raise stop_exception(stopped[0])
    if returncode != 0:
        errors = sorted(run_dir.glob(ERROR_GLOB))
        details = "\n".join(path.read_text() for path in errors) or "(no traceback was written; see the output above)"
        raise WorkerError(f"a worker failed (torchrun exit code {returncode}); run dir {run_dir}\n{details}")
    return json.loads((run_dir / SUMMARY_FILE).read_text()) if (run_dir / SUMMARY_FILE).exists() else {}


def wait_for_ranks(process: subprocess.Popen, run_dir: Path, launch: str, poll_s: float = 0.2) -> int:
    """torchrun's exit code, once it exits or its ranks were ended here: on a rank's user error at once (the others
    may wait in a collective for the one that failed), and when a rank reported a stop but torchrun is still there
    LONE_STOP_WAIT_S later (a rank stopped alone, outside the loop: its peers would wait for it in a collective).
    The caller acts on the reports."""
    stopped_at = None
    while True:
        try:
            return process.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            pass
        reports = read_exit_reports(run_dir, launch)
        if stopped_at is None and any("stopped" in report for report in reports):
            stopped_at = time.monotonic()
        lone_stop = stopped_at is not None and time.monotonic() - stopped_at > LONE_STOP_WAIT_S
        if lone_stop:
            log.warning(
                "a rank stopped on its own and the others did not follow within %.0f s: ending them", LONE_STOP_WAIT_S
            )
        if lone_stop or any("user_error" in report for report in reports):
            proctree.kill_tree(process)
            return (
                process.returncode if process.returncode is not None else -signal.SIGKILL
            )  # None: stuck in the kernel


def raise_user_error(reports: list[dict]) -> None:
    """Raise the lowest rank's reported user error as its own type (prefopt/core/errors.py), if any rank reported
    one."""
    errors = [report for report in reports if "user_error" in report]
    if errors:
        first = min(errors, key=lambda report: report["rank"])
        raise {kind.__name__: kind for kind in USER_ERRORS}.get(first["user_error"], ConfigError)(first["message"])


def stop_ranks(process: subprocess.Popen, signum: int) -> None:
    """Ranks in the training loop (they catch SIGTERM there, train/interrupt.py) get the stop signal: they
    agree on a step, checkpoint it and exit 0, and torchrun exits too; a second Ctrl-C or SIGTERM while they do ends
    them at once, and so does STOP_WAIT_S passing. Ranks outside the loop (starting up: nothing to checkpoint yet)
    are ended at once, quietly: a default SIGTERM would make torchrun print a traceback of its own."""
    ranks = [
        pid
        for pid in proctree.descendants(process.pid)
        if proctree.parent_of(pid) == process.pid and "prefopt.worker" in proctree.cmdline(pid)
    ]
    if not ranks or not all(proctree.catches(pid, signal.SIGTERM) for pid in ranks):
        proctree.kill_tree(process)
        return
    log.warning("stopping the ranks after their current step, with a checkpoint (again to stop at once)")
    proctree.signal_all(ranks, signum)
    try:
        process.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        log.warning(
            "the ranks did not stop within %.0f s: ending them (the last checkpoint on disk is intact)", STOP_WAIT_S
        )
        proctree.kill_tree(process)
    except KeyboardInterrupt:
        proctree.kill_tree(process)
    proctree.wait_gone(ranks, proctree.KILL_WAIT_S)


def read_exit_reports(run_dir: Path, launch: str) -> list[dict]:
    """The exit reports of this launch's ranks (another launch's, another host's or an earlier one, are not ours)."""
    reports = []
    for path in sorted(run_dir.glob(EXIT_REPORT.format(rank="*"))):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and report.get("launch") == launch:
            reports.append(report)
    return reports


def take_exit_reports(run_dir: Path, launch: str) -> list[dict]:
    """This launch's exit reports, removed: they are messages to this process, not a record of the run."""
    reports = read_exit_reports(run_dir, launch)
    for report in reports:
        (run_dir / EXIT_REPORT.format(rank=report["rank"])).unlink(missing_ok=True)
    return reports


def remove_exit_reports(run_dir: Path) -> None:
    for path in run_dir.glob(EXIT_REPORT.format(rank="*")):
        path.unlink(missing_ok=True)
