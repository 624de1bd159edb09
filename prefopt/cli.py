"""`prefopt` command line: subcommands dispatch to Hydra apps or plain argparse tools.

    prefopt train [HYDRA OVERRIDES]     compose loss/model/dataset/hardware, validate, train
    prefopt train --help | --cfg job | -m ... | --shell-completion install=bash
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from prefopt.config import ConfigError, register_schema

log = logging.getLogger("prefopt")

register_schema()

USAGE = """usage: prefopt <command> [args]

commands:
  train     compose a run from the config groups (loss, model, dataset, hardware) and train it.
            Hydra app: `prefopt train --help` lists the groups and options; `--cfg job` prints the
            composed config; `-m` sweeps; e.g. `prefopt train loss=dpo model=tiny_llama trainer.max_steps=10`
  worker    train from a frozen run dir config (what launchers run): `prefopt worker RUN_DIR/config.yaml`
  plot      overlay the probe log-prob trajectories of runs: `prefopt plot RUN_DIR [RUN_DIR ...] [-o out.png]`
  report    tabulate a sweep (per job: probe log-prob changes, eval accuracy, status) and plot it:
            `prefopt report SWEEP_DIR` writes report.md, report.csv, report.png there
  export    the latest policy of a run as a plain HF model (LoRA adapters merged): `prefopt export RUN_DIR [-o DIR]`
  toy       the softmax toy of the squeezing effect (Hydra app, conf/toy.yaml): `prefopt toy lr=4 steps=2`

`prefopt <command> --help` for a command's options.
"""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input: shown as one clear message, without a traceback."""
    from prefopt.data import DataError
    from prefopt.models import ModelNotFoundError

    return (ConfigError, DataError, ModelNotFoundError)


@hydra.main(version_base="1.3", config_path="pkg://prefopt.conf", config_name="config")
def train_app(cfg: DictConfig) -> Optional[float]:
    """Train one run; returns its objective (trainer.objective of the summary) for sweepers."""
    from prefopt.launch import WorkerError, dispatch, prepare_run
    from prefopt.sweep import objective_value, run_job

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return run_job(cfg, hydra_cfg)
    try:
        run_dir = prepare_run(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
        log.info("run dir: %s", run_dir)
        summary = dispatch(cfg, run_dir)
    except user_errors() as error:
        print(f"prefopt: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except WorkerError as error:
        print(f"prefopt: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    return objective_value(cfg, summary, required=False)


def worker_command(argv: list[str]) -> int:
    from prefopt.worker import main as worker_main

    worker_main(argv)
    return 0


def run_hydra_app(app: Callable, name: str, argv: list[str]) -> int:
    # Hydra reads sys.argv itself. Its help shows "prefopt <name>"; its completion script must register
    # plain "prefopt" (a completion function is bound to one word), which then calls `prefopt -sc ...`
    completing = any(arg.startswith(("-sc", "--shell-completion")) for arg in argv)
    sys.argv = ["prefopt" if completing else f"prefopt {name}", *argv]
    app()
    return 0


def completion_query(argv: list[str]) -> int:
    """Bash/zsh completion calls `prefopt -sc query=bash` with the whole line in COMP_LINE: drop the
    subcommand word from it so Hydra completes that subcommand's overrides."""
    words = os.environ.get("COMP_LINE", "").split(" ", 2)
    apps = {"train": train_app}
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
        return run_hydra_app(train_app, "train", rest)
    if command == "worker":
        return worker_command(rest)
    if command == "plot":
        from prefopt.plots import plot_command

        return plot_command(rest)
    if command == "report":
        from prefopt.report import report_command

        return report_command(rest)
    if command == "export":
        from prefopt.export import export_command

        return export_command(rest)
    if command == "toy":
        from prefopt.toy import toy_app

        return run_hydra_app(toy_app, "toy", rest)
    print(f"prefopt: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
