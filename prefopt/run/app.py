"""What `prefopt train` and `prefopt eval` do with the config Hydra composed (one run, or one job of a sweep), and
how a command ends: a failure or a stop said in one line on stderr, with its exit code, never a traceback for
something the user can fix. prefopt/cli.py parses the command line and builds the Hydra apps around these.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

from hydra._internal import utils as hydra_utils
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from prefopt.core.errors import USER_ERRORS, NonFiniteTrainingError, Terminated, closest, did_you_mean, stop_exception
from prefopt.core.runfiles import INSPECTION_SUMMARY
from prefopt.core.slurm import in_slurm_task
from prefopt.observe.console_lines import eval_headline
from prefopt.run import sweep  # looked up when called: tests patch sweep.objective_value
from prefopt.run.eval_run import prepare_eval, prepare_inspect
from prefopt.run.launch import WorkerError, dispatch, prepare_run
from prefopt.train.checkpoint import checkpoint_candidates

log = logging.getLogger("prefopt")

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


def create_output_dir(path: str, key: str) -> None:
    """The run or sweep dir `key`=`path`, created and written to once before Hydra uses it (cli.CreateOutputDir):
    a read-only or full disk is one line and exit 2, not Hydra's traceback."""
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
    if run_dir is None:
        return f"prefopt: {how}"
    if not checkpoint_candidates(run_dir):
        return f"prefopt: {how}; run dir {run_dir} has no checkpoint to resume from"
    kept = [override for override in overrides if not override.lstrip("+").startswith("trainer.resume=")]
    return f"prefopt: {how}; resume with: prefopt train {shlex.join([*kept, f'trainer.resume={run_dir}'])}"


def stopped_exit(stop: KeyboardInterrupt, run_dir: Optional[Path], overrides: list[str]) -> SystemExit:
    """Ctrl-C or SIGTERM said in one line (with how to resume), as its exit: 130 or 143."""
    terminated = isinstance(stop, Terminated)
    print(interrupted_message(run_dir, overrides, "terminated" if terminated else "interrupted"), file=sys.stderr)
    return SystemExit(TERMINATED_EXIT_CODE if terminated else INTERRUPTED_EXIT_CODE)


def failure_exit(error: Exception, path: Any) -> SystemExit:
    """A failure of `prefopt train` / `prefopt eval` said in one line on stderr, as the exit it causes: 2 for the
    user's input (config, data, model, an unwritable run dir), 1 for a failed run. Anything else is a bug: re-raised
    with its traceback (call this inside the `except` that caught it)."""
    if isinstance(error, USER_ERRORS):
        message, code = str(error), 2
    elif isinstance(error, (WorkerError, NonFiniteTrainingError)):
        message, code = str(error), 1
    elif isinstance(error, OSError) and error.errno in UNWRITABLE_HINTS:
        message, code = unwritable_message(error, path), 2
    else:
        raise error
    print(f"prefopt: error: {message}", file=sys.stderr)
    return SystemExit(code)


def unknown_option_line(error: MissingConfigException) -> Optional[str]:
    """`loss=gate_dpoo`: 'loss=gate_dpoo is not an option of loss (did you mean gate_dpo, ...?)'; None for a missing
    file that is not a group's option (a --config-name of the user's)."""
    if not error.options or not error.missing_cfg_file or "/" not in error.missing_cfg_file:
        return None
    group, option = error.missing_cfg_file.rsplit("/", 1)
    return f"{group}={option} is not an option of {group} ({did_you_mean(option, error.options)})"


def dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of a composed config (sections and leaves), without resolving a value; hydra.* left out."""
    keys = []
    for key in node.keys() if OmegaConf.is_dict(node) else ():
        name = f"{prefix}{key}"
        if name == "hydra":
            continue
        keys.append(name)
        child = node._get_node(key)
        if OmegaConf.is_dict(child) and not child._is_missing() and not child._is_none():
            keys += dotted_keys(child, f"{name}.")
    return keys


MAX_LISTED_KEYS = 15  # an unknown key like no other: the keys beside it are listed when there are this few


def unknown_key_line(error: ConfigCompositionException, command: str) -> Optional[str]:
    """`trainer.lrr=1e-5`: 'trainer.lrr is not a config key (did you mean trainer.lr?)': the closest of the keys beside
    it, else of the whole config, else the few keys beside it. None when the error is another one."""
    cause = error.__cause__
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or cause.parent_node is None:
        return None
    unknown, parent = cause.full_key, cause.parent_node
    prefix = f"{parent._get_full_key(None)}." if parent._get_full_key(None) else ""
    siblings = {str(key): f"{prefix}{key}" for key in parent.keys() if f"{prefix}{key}" != "hydra"}
    # the keys beside it share its prefix: compare what differs
    close = [siblings[key] for key in closest(unknown.removeprefix(prefix), siblings)]
    if not close:  # a key put under the wrong section: the same last name elsewhere (trainer.beta -> loss.beta)
        keys = dotted_keys(parent._get_root())
        names = closest(unknown.rsplit(".", 1)[-1], {key.rsplit(".", 1)[-1] for key in keys})
        close = [key for key in keys if key.rsplit(".", 1)[-1] in names][:3]
    if close:
        hint = f"did you mean {', '.join(close)}?"
    elif len(siblings) <= MAX_LISTED_KEYS:
        hint = f"the keys there: {', '.join(siblings.values())}"
    else:
        hint = "no key is close"
    return f"{unknown} is not a config key ({hint}); `prefopt {command} --help` lists the keys"


@contextlib.contextmanager
def composition_errors_explained(command: str) -> Iterator[None]:
    """An unknown key or group option on the command line fails in one line naming it and the closest matches, exit
    2, instead of Hydra's 'To append to your config use +key' (a key the schema lacks is refused anyway). Hydra
    reports composition errors inside hydra._internal.utils.run_and_report, before any prefopt code runs: wrap it
    while the app runs (its other errors are Hydra's as before; tests/test_cli.py holds the messages)."""
    original = hydra_utils.run_and_report

    def run_and_report(func: Any) -> Any:
        def explained() -> Any:
            try:
                return func()
            except MissingConfigException as error:
                line = unknown_option_line(error)
                if line is None:
                    raise
            except ConfigCompositionException as error:
                line = unknown_key_line(error, command)
                if line is None:
                    raise
            print(f"prefopt: error: {line}", file=sys.stderr)
            raise SystemExit(2)

        return original(explained)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """SIGTERM (kill, `timeout`, systemd, container runtimes) raises errors.Terminated, a KeyboardInterrupt: the run
    stops as on Ctrl-C (the trainer checkpoints the last whole step; torchrun's ranks are stopped the same way).
    Inside a SLURM task SIGTERM stays SLURM's (prefopt/core/slurm.py)."""
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


def train_run(cfg: DictConfig) -> Optional[float]:
    """Train one run; returns its objective (trainer.objective of the summary) for sweepers."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return sweep.run_job(cfg, hydra_cfg)
    run_dir = None
    try:
        run_dir = prepare_run(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
        log.info("run dir: %s", run_dir)
        summary = dispatch(cfg, run_dir)
    except KeyboardInterrupt as stop:
        raise stopped_exit(stop, run_dir, list(hydra_cfg.overrides.task)) from None
    except Exception as error:
        raise failure_exit(error, run_dir or hydra_cfg.runtime.output_dir) from None
    return sweep.objective_value(cfg, summary, required=False)


def eval_run(cfg: DictConfig) -> Optional[float]:
    """Evaluate one policy (prefopt/run/eval_run.py) into a run dir of its own; returns its objective for sweepers."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return sweep.run_job(cfg, hydra_cfg, command="eval")
    run_dir, summary = run_here(cfg, hydra_cfg, "eval", prepare_eval)
    print(
        f"{eval_headline(summary.get('steps', 0), summary)}\nwrote {run_dir} (metrics.jsonl, dynamics.jsonl, "
        f"summary.json); `prefopt plot {run_dir}` draws its probes"
    )
    return sweep.objective_value(cfg, summary, required=False)


def inspect_run(cfg: DictConfig) -> None:
    """Inspect the pairs (prefopt/recipes/inspect.py) into a run dir of its own, and print the summary."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep.run_job(cfg, hydra_cfg, command="inspect")
        return
    run_dir, _ = run_here(cfg, hydra_cfg, "inspect", prepare_inspect)
    print(
        f"{(run_dir / INSPECTION_SUMMARY).read_text().rstrip()}\nwrote {run_dir} (inspection.parquet, inspection.csv, "
        "inspection_histograms.png, inspection_scatter.png); filter by a column with dataset.filter.column=ches_norm "
        "dataset.filter.quantile=0.9"
    )


def run_here(cfg: DictConfig, hydra_cfg, command: str, prepare) -> tuple[Path, dict[str, Any]]:
    """One job of a command that runs where it is started (eval, inspect): prepare(cfg, hydra dir, overrides) freezes
    its run dir, then the worker runs it; a stop or failure is said in one line. Returns (run dir, summary)."""
    run_dir = None
    try:
        run_dir = prepare(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
        log.info("%s run dir: %s", command, run_dir)
        return run_dir, dispatch(cfg, run_dir, command=command)
    except KeyboardInterrupt as stop:
        raise stopped_exit(stop, None, []) from None
    except Exception as error:
        raise failure_exit(error, run_dir or hydra_cfg.runtime.output_dir) from None
