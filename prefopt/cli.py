"""`prefopt` command line: subcommands dispatch to Hydra apps or plain argparse tools.

prefopt train [HYDRA OVERRIDES]     compose loss/model/dataset/hardware, validate, train
prefopt train --help | --cfg job (resolved: shows the hardware auto chose) | -m ... | --shell-completion install=bash
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from prefopt.run.config import ConfigError, register_schema

log = logging.getLogger("prefopt")

register_schema()

USAGE = """usage: prefopt <command> [args]

commands:
  train     compose a run from the config groups (loss, model, dataset, hardware) and train it.
            Hydra app: `prefopt train --help` lists the groups and options; `--cfg job` prints the
            composed config; `-m` sweeps; e.g. `prefopt train loss=dpo model=tiny_llama trainer.max_steps=10`
  eval      evaluate a run's policy as training does (reward accuracy and margins against the base model, greedy
            accuracy, probes) into a run dir of its own: `prefopt eval RUN_DIR` (newest checkpoint, the run's config),
            `prefopt eval CHECKPOINT_DIR`, `prefopt eval MODEL_DIR model=... dataset=... loss=...`; Hydra app, `-m` sweeps
  data      show what a run would train on, without training: the source and layout found, train/eval counts, skipped
            and truncated rows, the eval split's origin and the first pairs decoded from their token ids (what the model
            reads): `prefopt data [--pairs N] dataset=local dataset.path=pairs.jsonl model=...` (train's overrides)
  worker    train from a frozen run dir config (what launchers run): `prefopt worker RUN_DIR/config.yaml`
  plot      overlay the probe log-prob trajectories of runs: `prefopt plot RUN_DIR [RUN_DIR ...] [-o out.png]`
  report    tabulate a sweep (per job: probe log-prob changes, eval accuracy, status) and plot it:
            `prefopt report SWEEP_DIR` writes report.md, report.csv, report.png there;
            `--group-by loss [--baseline loss=dpo]` aggregates seeds: mean, std, 95% t intervals, paired differences
  export    the latest policy of a run as a plain HF model (LoRA adapters merged) with a model card (README.md):
            `prefopt export RUN_DIR [-o DIR] [--push-to-hub REPO_ID]`
  toy       the softmax toy of the squeezing effect (Hydra app, conf/toy.yaml): `prefopt toy lr=4 steps=2`

`prefopt <command> --help` for a command's options.
"""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: shown as one clear message, without a traceback."""
    from prefopt.core.errors import USER_ERRORS

    return USER_ERRORS


# errno -> how to fix it: a full or read-only disk is reported as one line, not a traceback
UNWRITABLE_HINTS = {
    errno.ENOSPC: "the disk is full: free space, or point hydra.run.dir at another disk",
    errno.EDQUOT: "the disk quota is used up: free space, or point hydra.run.dir at another disk",
    errno.EROFS: "the file system is read-only: point hydra.run.dir at a writable directory",
    errno.EACCES: "no permission: fix the permissions, or use another path (hydra.run.dir for the run's outputs)",
}
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C
TERMINATED_EXIT_CODE = 143  # 128 + SIGTERM


def unwritable_hint(error: OSError) -> str:
    return UNWRITABLE_HINTS.get(error.errno, "point hydra.run.dir at a writable directory")


def unwritable_message(error: OSError, path: Any) -> str:
    """'cannot write PATH: No space left on device; the disk is full: ...'. The error's own file name wins."""
    action = "access" if error.errno == errno.EACCES else "write"  # a permission error may come from a read
    return f"cannot {action} {error.filename or path}: {error.strerror}; {unwritable_hint(error)}"


running_app = ""  # the Hydra app run_hydra_app is running ("train", "eval", "toy")


class CreateOutputDir(Callback):
    """Hydra creates the run (or sweep) dir, saves .hydra/ and opens its log file there before any prefopt
    code runs, and reports a failure as a traceback; conf/config.yaml registers this callback to create
    the dir first and fail in one line instead."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from prefopt.core.rundir import refuse_outside_links
        from prefopt.run.launch import defer_hydra_record

        try:
            refuse_outside_links(Path(config.hydra.run.dir))  # before Hydra opens its log file there
        except ConfigError as error:
            print(f"prefopt: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        create_output_dir(config.hydra.run.dir, "hydra.run.dir")
        if running_app == "train":  # prepare_run writes the record once accepted (prepare_eval does not)
            defer_hydra_record(config)  # a dir that holds a run keeps its .hydra/ until this launch is accepted

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from prefopt.run.launch import defer_sweep_hydra_records

        if running_app == "train":
            defer_sweep_hydra_records(config)  # resumed or reused jobs keep their .hydra/ until each is accepted
        create_output_dir(config.hydra.sweep.dir, "hydra.sweep.dir")


def create_output_dir(path: str, key: str) -> None:
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # a read-only or full disk fails here, not inside Hydra
    except OSError as error:
        problem = f"cannot create or write this directory: {error.strerror}; {unwritable_hint(error)}"
        print(f"prefopt: error: {key}={path}: {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def interrupted_message(run_dir: Optional[Path], overrides: list[str], how: str = "interrupted") -> str:
    """One line for Ctrl-C (how="terminated": SIGTERM); with the command that continues the run when it left a
    checkpoint."""
    from prefopt.train.checkpoint import checkpoint_candidates

    if run_dir is None:
        return f"prefopt: {how}"
    if not checkpoint_candidates(run_dir):
        return f"prefopt: {how}; run dir {run_dir} has no checkpoint to resume from"
    kept = [override for override in overrides if not override.lstrip("+").startswith("trainer.resume=")]
    return f"prefopt: {how}; resume with: prefopt train {shlex.join([*kept, f'trainer.resume={run_dir}'])}"


def stopped_exit(stop: KeyboardInterrupt, run_dir: Optional[Path], overrides: list[str]) -> SystemExit:
    """Ctrl-C or SIGTERM said in one line (with how to resume), as its exit: 130 or 143."""
    from prefopt.core.errors import Terminated

    terminated = isinstance(stop, Terminated)
    print(interrupted_message(run_dir, overrides, "terminated" if terminated else "interrupted"), file=sys.stderr)
    return SystemExit(TERMINATED_EXIT_CODE if terminated else INTERRUPTED_EXIT_CODE)


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """SIGTERM (kill, `timeout`, systemd, container runtimes) raises errors.Terminated, a KeyboardInterrupt: the run
    stops as on Ctrl-C (the trainer checkpoints the last whole step; torchrun's ranks are stopped the same way).
    Inside a SLURM task SIGTERM stays SLURM's (prefopt/core/slurm.py)."""
    from prefopt.core.errors import stop_exception
    from prefopt.core.slurm import in_slurm_task

    if in_slurm_task() or threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_stop(signum: int, frame) -> None:
        raise stop_exception(signum)

    previous = signal.signal(signal.SIGTERM, raise_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@hydra.main(version_base="1.3", config_path="pkg://prefopt.conf", config_name="config")
def train_app(cfg: DictConfig) -> Optional[float]:
    """Train one run; returns its objective (trainer.objective of the summary) for sweepers."""
    from prefopt.run.launch import dispatch, prepare_run
    from prefopt.run.sweep import objective_value, run_job

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return run_job(cfg, hydra_cfg)
    run_dir = None
    try:
        run_dir = prepare_run(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
        log.info("run dir: %s", run_dir)
        summary = dispatch(cfg, run_dir)
    except KeyboardInterrupt as stop:
        raise stopped_exit(stop, run_dir, list(hydra_cfg.overrides.task)) from None
    except Exception as error:
        raise failure_exit(error, run_dir or hydra_cfg.runtime.output_dir) from None
    return objective_value(cfg, summary, required=False)


@hydra.main(version_base="1.3", config_path="pkg://prefopt.conf", config_name="config")
def eval_app(cfg: DictConfig) -> Optional[float]:
    """Evaluate one policy (prefopt/run/eval_run.py) into a run dir of its own; returns its objective for sweepers."""
    from prefopt.observe.console import eval_headline
    from prefopt.run.eval_run import prepare_eval
    from prefopt.run.launch import dispatch
    from prefopt.run.sweep import objective_value, run_job

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return run_job(cfg, hydra_cfg, command="eval")
    run_dir = None
    try:
        run_dir = prepare_eval(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
        log.info("eval run dir: %s", run_dir)
        summary = dispatch(cfg, run_dir, command="eval")
    except KeyboardInterrupt as stop:
        raise stopped_exit(stop, None, []) from None
    except Exception as error:
        raise failure_exit(error, run_dir or hydra_cfg.runtime.output_dir) from None
    print(
        f"{eval_headline(summary.get('steps', 0), summary)}\nwrote {run_dir} (metrics.jsonl, dynamics.jsonl, summary.json); "
        f"`prefopt plot {run_dir}` draws its probes"
    )
    return objective_value(cfg, summary, required=False)


def failure_exit(error: Exception, path: Any) -> SystemExit:
    """A failure of `prefopt train` / `prefopt eval` said in one line on stderr, as the exit it causes: 2 for the
    user's input (config, data, model, an unwritable run dir), 1 for a failed run. Anything else is a bug: re-raised
    with its traceback (call this inside the `except` that caught it)."""
    from prefopt.core.errors import NonFiniteTrainingError
    from prefopt.run.launch import WorkerError

    if isinstance(error, user_errors()):
        message, code = str(error), 2
    elif isinstance(error, (WorkerError, NonFiniteTrainingError)):
        message, code = str(error), 1
    elif isinstance(error, OSError) and error.errno in UNWRITABLE_HINTS:
        message, code = unwritable_message(error, path), 2
    else:
        raise error
    print(f"prefopt: error: {message}", file=sys.stderr)
    return SystemExit(code)


def resolve_shown_config(argv: list[str]) -> list[str]:
    """`--cfg job` prints the job config resolved (adds --resolve): hardware=auto's keys are interpolations,
    and only resolving them shows the preset it chooses for this job and why (hardware.chosen_by)."""
    for index, arg in enumerate(argv):
        shows_job = arg in ("--cfg=job", "-cjob") or (arg in ("--cfg", "-c") and argv[index + 1 : index + 2] == ["job"])
        if shows_job and "--resolve" not in argv:
            return [*argv, "--resolve"]
    return argv


def worker_command(argv: list[str]) -> int:
    from prefopt.worker import main as worker_main

    worker_main(argv)
    return 0


def run_hydra_app(app: Callable, name: str, argv: list[str]) -> int:
    # Hydra reads sys.argv itself. Its help shows "prefopt <name>"; its completion script must register
    # plain "prefopt" (a completion function is bound to one word), which then calls `prefopt -sc ...`
    global running_app
    running_app = name
    completing = any(arg.startswith(("-sc", "--shell-completion")) for arg in argv)
    sys.argv = ["prefopt" if completing else f"prefopt {name}", *argv]
    try:
        with (
            sigterm_stops()
        ):  # for the whole app: one run, every job of a sweep (-m), and Hydra's composing around them
            app()
    except KeyboardInterrupt as stop:  # outside train_app's handler: while Hydra composes, in a sweep, in another app
        return stopped_exit(stop, None, []).code
    return 0


def completion_query(argv: list[str]) -> int:
    """Bash/zsh completion calls `prefopt -sc query=bash` with the whole line in COMP_LINE: drop the
    subcommand word from it so Hydra completes that subcommand's overrides."""
    words = os.environ.get("COMP_LINE", "").split(" ", 2)
    apps = {"train": train_app, "eval": eval_app}
    if len(words) < 2 or words[1] not in apps:
        print(" ".join(apps))  # completing the subcommand itself
        return 0
    os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]])
    os.environ["COMP_POINT"] = str(max(0, int(os.environ.get("COMP_POINT", "0")) - len(words[1]) - 1))
    return run_hydra_app(apps[words[1]], words[1], argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("-sc", "--shell-completion"):
        return completion_query(argv)
    command, rest = argv[0], argv[1:]
    if command == "train":
        return run_hydra_app(train_app, "train", resolve_shown_config(rest))
    if command == "eval":
        from prefopt.run.eval_run import policy_argument

        return run_hydra_app(eval_app, "eval", resolve_shown_config(policy_argument(rest)))
    if command == "worker":
        return worker_command(rest)
    if command == "data":
        from prefopt.run.data_preview import data_command

        return data_command(rest)
    if command == "plot":
        from prefopt.observe.plots import plot_command

        return plot_command(rest)
    if command == "report":
        from prefopt.observe.report import report_command

        return report_command(rest)
    if command == "export":
        from prefopt.run.export import export_command

        return export_command(rest)
    if command == "toy":
        from prefopt.run.toy import toy_app

        return run_hydra_app(toy_app, "toy", rest)
    print(f"prefopt: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
