"""`prefopt` command line: COMMANDS, the table of subcommands (name -> handler; a handler's docstring is its help in
`prefopt --help`), and each command's argument parsing; the library below takes plain arguments.

prefopt train [HYDRA OVERRIDES]     compose loss/model/dataset/hardware, validate, train
prefopt train --help [TOPIC] (read from conf/, no Hydra) | --cfg job (resolved: shows the hardware auto chose) | -m ...
prefopt --shell-completion install=bash     completes every subcommand, and the Hydra apps' overrides

Start-up: importing this module loads two small core modules (errors, runfiles) and no heavy library (Hydra, torch,
matplotlib); a handler imports what its command needs once its arguments are parsed, so `prefopt --help`, `prefopt
report --help` and `prefopt plot --help` answer at once. The Hydra apps (train, eval, toy) are built by their
handlers around the tasks below.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from prefopt.core.errors import ConfigError
from prefopt.core.runfiles import EXPORT_DIR, PLOT_FILE

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("prefopt")

running_app = ""  # the Hydra app run_hydra_app is running ("train", "eval", "inspect", "toy")


class CreateOutputDir:
    """Hydra creates the run (or sweep) dir, saves .hydra/ and opens its log file there before any prefopt
    code runs, and reports a failure as a traceback; conf/config.yaml registers this callback to create
    the dir first and fail in one line instead. Hydra (1.3) calls each callback hook by name: the two it
    needs act, the others do nothing (no base class: importing Hydra's would slow every command's start)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from prefopt.core.rundir import refuse_outside_links
        from prefopt.run.app import create_output_dir
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
        from prefopt.run.app import create_output_dir
        from prefopt.run.launch import defer_sweep_hydra_records

        if running_app == "train":
            defer_sweep_hydra_records(config)  # resumed or reused jobs keep their .hydra/ until each is accepted
        create_output_dir(config.hydra.sweep.dir, "hydra.sweep.dir")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None: ...
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None: ...
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None: ...
    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None: ...


# ---- Hydra apps: train, eval, toy -------------------------------------------------------------------------------


def train_task(cfg: DictConfig) -> Optional[float]:
    """`prefopt train`'s Hydra task: one run, or one job of a sweep (prefopt/run/app.py); returns its objective."""
    from prefopt.run.app import train_run
    from prefopt.run.config import register_schema

    register_schema()  # a SLURM job unpickles this task in a fresh process: the resolvers must be known there too
    return train_run(cfg)


def eval_task(cfg: DictConfig) -> Optional[float]:
    """`prefopt eval`'s Hydra task: one policy evaluated into a run dir of its own (prefopt/run/app.py)."""
    from prefopt.run.app import eval_run
    from prefopt.run.config import register_schema

    register_schema()
    return eval_run(cfg)


def inspect_task(cfg: DictConfig) -> None:
    """`prefopt inspect`'s Hydra task: the pairs inspected into a run dir of its own (prefopt/run/app.py)."""
    from prefopt.run.app import inspect_run
    from prefopt.run.config import register_schema

    register_schema()
    inspect_run(cfg)


def toy_task(cfg: DictConfig) -> None:
    """The softmax toy (prefopt/run/toy.py, conf/toy.yaml): plots and numbers into the output dir."""
    from hydra.core.hydra_config import HydraConfig

    from prefopt.run.toy import run_toy, write_toy

    try:
        results = run_toy(cfg)
    except ConfigError as error:
        print(f"prefopt: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(write_toy(results, Path(HydraConfig.get().runtime.output_dir)))


HYDRA_APPS = {
    "train": (train_task, "config"),
    "eval": (eval_task, "config"),
    "inspect": (inspect_task, "config"),
    "toy": (toy_task, "toy"),
}


def run_hydra_app(name: str, argv: list[str]) -> int:
    """Run Hydra app `name` (HYDRA_APPS: its task and config) on argv. Hydra reads sys.argv itself. Its help shows
    "prefopt <name>"; its completion script must register plain "prefopt" (a completion function is bound to one
    word), which then calls `prefopt -sc ...`."""
    import hydra

    from prefopt.run.app import composition_errors_explained, sigterm_stops, stopped_exit
    from prefopt.run.config import register_schema

    global running_app
    running_app = name
    task, config_name = HYDRA_APPS[name]
    if config_name == "config":
        register_schema()  # conf/config.yaml's prefopt_schema and hardware=auto's resolver
    app = hydra.main(version_base="1.3", config_path="pkg://prefopt.conf", config_name=config_name)(task)
    completing = any(arg.startswith(("-sc", "--shell-completion")) for arg in argv)
    sys.argv = ["prefopt" if completing else f"prefopt {name}", *argv]
    try:
        # the whole app: one run, every job of a sweep (-m), and Hydra composing around them
        with sigterm_stops(), composition_errors_explained(name):
            app()
    except KeyboardInterrupt as stop:  # outside the task's handler: while Hydra composes, in a sweep, in another app
        return stopped_exit(stop, None, []).code
    return 0


def hydra_app_help(name: str, handler: Callable[[list[str]], int], argv: list[str]) -> Optional[int]:
    """`prefopt NAME --help [TOPIC]` read from conf/ without starting Hydra (prefopt/run/confhelp.py); None when argv
    asks for something else. Its summary is the handler's first docstring line."""
    from prefopt.run.confhelp import help_text, help_topic

    wanted, topic = help_topic(argv)
    if not wanted:
        return None
    summary = inspect.cleandoc(handler.__doc__).splitlines()[0]
    try:
        print(help_text(name, summary, HYDRA_APPS[name][1], topic))
    except ConfigError as error:
        print(f"prefopt: error: {error}", file=sys.stderr)
        return 2
    return 0


def resolve_shown_config(argv: list[str]) -> list[str]:
    """`--cfg job` prints the job config resolved (adds --resolve): hardware=auto's keys are interpolations,
    and only resolving them shows the preset it chooses for this job and why (hardware.chosen_by)."""
    for index, arg in enumerate(argv):
        shows_job = arg in ("--cfg=job", "-cjob") or (arg in ("--cfg", "-c") and argv[index + 1 : index + 2] == ["job"])
        if shows_job and "--resolve" not in argv:
            return [*argv, "--resolve"]
    return argv


def policy_argument(argv: list[str]) -> list[str]:
    """`prefopt eval X ...` -> `prefopt eval eval.policy=X ...`: a first argument that is neither an
    override nor an option names the policy (quoted for Hydra when it holds characters its grammar uses)."""
    if not argv or "=" in argv[0] or argv[0].startswith("-"):
        return argv
    value = argv[0]
    if any(not (char.isalnum() or char in "_-./~+:@") for char in value):
        value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [f"eval.policy={value}", *argv[1:]]


def train_command(argv: list[str]) -> int:
    """compose a run from the config groups (loss, model, dataset, hardware) and train it.
    Hydra app: `prefopt train --help` lists the groups and options; `--cfg job` prints the
    composed config; `-m` sweeps; e.g. `prefopt train loss=dpo model=tiny_llama trainer.max_steps=10`"""
    shown = hydra_app_help("train", train_command, argv)
    return shown if shown is not None else run_hydra_app("train", resolve_shown_config(argv))


def eval_command(argv: list[str]) -> int:
    """evaluate a run's policy as training does (reward accuracy and margins against the base model, greedy
    accuracy, probes) into a run dir of its own: `prefopt eval RUN_DIR` (newest checkpoint, the run's config),
    `prefopt eval CHECKPOINT_DIR`, `prefopt eval MODEL_DIR model=... dataset=... loss=...`; Hydra app, `-m` sweeps"""
    shown = hydra_app_help("eval", eval_command, argv)
    return shown if shown is not None else run_hydra_app("eval", resolve_shown_config(policy_argument(argv)))


def inspect_command(argv: list[str]) -> int:
    """per pair, before training: reference log-probs, lengths, token overlap, the step-0 gates and CHES (which pairs
    will displace the chosen response; Razin et al. 2024): a table (parquet, csv), histograms, a scatter and a summary
    in a run dir of its own; train's overrides, e.g. `prefopt inspect dataset=local dataset.path=pairs.jsonl`;
    `inspect.policy=RUN_DIR` adds how far that run moved each pair; then dataset.filter.column=ches_norm trains on the
    pairs a column keeps"""
    shown = hydra_app_help("inspect", inspect_command, argv)
    return shown if shown is not None else run_hydra_app("inspect", resolve_shown_config(argv))


def toy_command(argv: list[str]) -> int:
    """the softmax toy of the squeezing effect (Hydra app, conf/toy.yaml): `prefopt toy lr=4 steps=2`"""
    shown = hydra_app_help("toy", toy_command, argv)
    return shown if shown is not None else run_hydra_app("toy", argv)


def worker_command(argv: list[str]) -> int:
    """train from a frozen run dir config (what launchers run): `prefopt worker RUN_DIR/config.yaml`"""
    from prefopt.worker import main as worker_main

    worker_main(argv)
    return 0


def examples_command(argv: list[str]) -> int:
    """the runnable example recipes shipped in the package: `prefopt examples` lists them,
    `prefopt examples run NAME [OVERRIDES]` runs one here (run dirs under ./outputs/examples/),
    `prefopt examples copy [NAME ...] [-o DIR]` copies scripts and sample data to edit (default ./prefopt-examples)"""
    from prefopt.run.examples import main as examples_main

    return examples_main(argv)


# ---- argparse commands: data, plot, report, export --------------------------------------------------------------


def data_command(argv: list[str]) -> int:
    """show what a run would train on, without training: the source and layout found, train/eval counts, skipped
    and truncated rows, the eval split's origin and the first pairs decoded from their token ids (what the model
    reads): `prefopt data [--pairs N] dataset=local dataset.path=pairs.jsonl model=...` (train's overrides)"""
    parser = argparse.ArgumentParser(
        prog="prefopt data",
        description="Show the preference data a run would train on: the source and layout found, train/eval counts, "
        "skipped and truncated rows, the eval split's origin, and the first pairs as the model sees them (decoded from "
        "their token ids, special tokens visible). Takes the same Hydra overrides as `prefopt train`, e.g. "
        "`prefopt data dataset=local dataset.path=pairs.jsonl model=qwen2_5_0_5b`. Loads the tokenizer only.",
    )
    parser.add_argument("--pairs", "-n", type=int, default=3, help="training pairs to show (default 3)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for `prefopt train`")
    args = parser.parse_args(argv)
    from prefopt.run import data_preview
    from prefopt.run.app import failure_exit, stopped_exit

    data_preview.log_warnings_in_one_line()  # warnings as `prefopt train` says them
    try:
        cfg, tokenizer, data = data_preview.load_run_data(args.overrides)
    except KeyboardInterrupt as stop:  # Ctrl-C while it tokenizes: one line, exit 130
        return stopped_exit(stop, None, []).code
    except Exception as error:  # a user error or a full/read-only disk: one line, exit 2; anything else: a bug, raised
        return failure_exit(error, "the tokenized-pairs cache (dataset.cache_dir)").code
    print(data_preview.describe_data(cfg, data, tokenizer, max(0, args.pairs)))
    return 0


def plot_command(argv: list[str]) -> int:
    """training curves (loss, margin, accuracy, log-probs, rewards, lr, grad norm; train and eval) of runs, with their
    probe panels when they probed: `prefopt plot RUN_DIR [RUN_DIR ...] [-o out.png] [--smooth 0.6]`"""
    parser = argparse.ArgumentParser(
        prog="prefopt plot",
        description="Plot one or more run dirs in one PNG, from their metrics.jsonl: loss, reward margin, reward "
        "accuracy, chosen/rejected log-probs and rewards, learning rate, gradient norm; train steps as lines, evals as "
        "points. Runs that probed (dynamics.enabled=true) also get the probe log-prob panels (dynamics.jsonl). Several "
        "runs: one color each, the legend names the settings that differ, the title those they share.",
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run dirs holding metrics.jsonl; a folder that is none (a sweep dir, a folder of runs): every run in it",
    )
    parser.add_argument("-o", "--output", help=f"PNG to write (default: FIRST_RUN_DIR/{PLOT_FILE})")
    parser.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="smooth the train lines with an exponential moving average of this weight, as TensorBoard's slider "
        "(0 = off, the default; 0.6 moderate; 0.9 heavy); the raw line stays, faint",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        parser.error(f"--smooth {args.smooth}: give a weight from 0 (off) up to, not including, 1 (e.g. 0.6)")
    from prefopt.observe.curves import plot_training
    from prefopt.observe.plots import RunDirError

    try:
        path = plot_training(args.run_dirs, args.output or Path(args.run_dirs[0]) / PLOT_FILE, args.smooth)
    except RunDirError as error:
        print(f"prefopt: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


def split_keys(values: Optional[list[str]]) -> list[str]:
    """`--group-by loss,loss.gate.kind --group-by loss.beta` -> [loss, loss.gate.kind, loss.beta]."""
    keys: list[str] = []
    for value in values or []:
        for key in (part.strip() for part in value.split(",")):
            if key and key not in keys:
                keys.append(key)
    return keys


def report_command(argv: list[str]) -> int:
    """tabulate a sweep, or any folder of run dirs (per run: what differs, probe log-prob changes, eval accuracy,
    status) and plot it: `prefopt report DIR` writes report.md, report.csv, report.png there;
    `--group-by loss [--baseline loss=dpo]` aggregates seeds: mean, std, 95% t intervals, paired differences;
    `--fit loss.beta` fits each headline metric against a numeric group-by key (slope, its 95% interval, R^2)"""
    parser = argparse.ArgumentParser(
        prog="prefopt report",
        description="Tabulate a sweep (prefopt train -m), or the run dirs found at any depth in any other folder "
        "(ad-hoc runs, several sweeps): per run the settings that differ (those all share are stated once above the "
        "table), the probe log-prob changes, eval accuracy and status; writes report.md, report.csv and report.png "
        "(the runs' training curves and probe panels, as `prefopt plot`) into DIR. With --group-by: statistics over "
        "seeds per group (n, mean, std, 95% Student-t interval) in report_groups.md, report_groups.csv and "
        "report_bands.png; with --fit KEY also report_fit.csv and report_fit.png.",
    )
    parser.add_argument(
        "sweep_dir",
        metavar="DIR",
        type=Path,
        help="a multirun dir holding job dirs 0, 1, 2, ..., or a folder holding run dirs (config.yaml with "
        "metrics.jsonl or summary.json) at any depth",
    )
    parser.add_argument(
        "--group-by",
        action="append",
        metavar="KEYS",
        help="config keys whose values define a group, comma-separated or repeated (e.g. loss,loss.gate.kind); "
        "the jobs of a group must differ only in trainer.seed",
    )
    parser.add_argument(
        "--baseline",
        action="append",
        metavar="KEY=VALUE",
        help="the group the others are compared with, seed by seed (e.g. loss=dpo); needs --group-by. Keys it does "
        "not name stratify: each group is compared with the baseline that shares their values",
    )
    parser.add_argument(
        "--fit",
        metavar="KEY",
        help="least-squares line of each headline metric (and per-term gradient norm) against KEY, a numeric "
        "--group-by key, within each stratum of the other keys: slope, its 95%% interval, R^2 (e.g. --fit loss.r2)",
    )
    args = parser.parse_args(argv)
    group_by = split_keys(args.group_by)
    if args.baseline and not group_by:
        print("prefopt: error: --baseline needs --group-by (e.g. --group-by loss --baseline loss=dpo)", file=sys.stderr)
        return 2
    if args.fit and not group_by:
        print(
            f"prefopt: error: --fit {args.fit} needs --group-by with it among the keys (e.g. --group-by {args.fit} "
            f"--fit {args.fit})",
            file=sys.stderr,
        )
        return 2
    from prefopt.observe.plots import RunDirError
    from prefopt.observe.report import report_sweep

    try:
        text = report_sweep(args.sweep_dir, group_by, args.baseline, args.fit)
    except (RunDirError, ConfigError) as error:
        print(f"prefopt: error: {error}", file=sys.stderr)
        return 2
    print(text)
    return 0


def export_command(argv: list[str]) -> int:
    """the latest policy of a run as a plain HF model (LoRA adapters merged) with a model card (README.md):
    `prefopt export RUN_DIR [-o DIR] [--push-to-hub REPO_ID]`"""
    parser = argparse.ArgumentParser(
        prog="prefopt export",
        description=EXPORT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, help="a run dir with checkpoints/")
    parser.add_argument("-o", "--output", type=Path, default=None, help=f"output dir (default RUN_DIR/{EXPORT_DIR})")
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        default=None,
        help="also upload the exported dir to this Hugging Face Hub repo (user/name; created if missing)",
    )
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = parser.parse_args(argv)
    from prefopt.core.errors import USER_ERRORS
    from prefopt.run.export import CARD_FILE, export_policy, push_to_hub

    try:
        output = export_policy(args.run_dir, args.output or args.run_dir / EXPORT_DIR, title=args.push_to_hub)
        print(f"exported {output} (model card: {output / CARD_FILE})")
        if args.push_to_hub:
            print(f"pushed to the hub: {push_to_hub(output, args.push_to_hub, args.private)}")
    except USER_ERRORS as error:  # HubError among them: the export is complete, only the push failed
        print(f"prefopt: error: {error}", file=sys.stderr)
        return 2
    return 0


EXPORT_DESCRIPTION = """\
`prefopt export RUN_DIR [-o OUT_DIR] [--push-to-hub REPO_ID]`: the run's latest policy as one plain HF model
directory, with a model card (README.md, prefopt/run/modelcard.py), optionally uploaded to the Hugging Face Hub.

A LoRA run's checkpoints hold adapters only; export loads the base model named in the run's frozen
config, applies the adapters and merges them into the weights. A full fine-tune is copied as is.
The directory is built beside its target and renamed into place, so it is always whole; the upload comes
after, so a failed push (offline, not logged in) leaves a complete export to push later.
"""


# ---- the command table ------------------------------------------------------------------------------------------


# name -> handler (the arguments after the name -> exit code); `prefopt --help` shows each handler's docstring
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": train_command,
    "eval": eval_command,
    "inspect": inspect_command,
    "data": data_command,
    "worker": worker_command,
    "plot": plot_command,
    "report": report_command,
    "export": export_command,
    "toy": toy_command,
    "examples": examples_command,
}


def usage() -> str:
    lines = ["usage: prefopt <command> [args]", "", "commands:"]
    for name, handler in COMMANDS.items():
        first, *rest = inspect.cleandoc(handler.__doc__).splitlines()
        lines += [f"  {name:<9} {first}", *(f"{'':12}{line}" for line in rest)]
    tail = [
        "",
        '`prefopt <command> --help` for a command\'s options; `eval "$(prefopt --shell-completion install=bash)"`'
        " completes commands and overrides on <TAB>.",
        "",
    ]
    return "\n".join([*lines, *tail])


# subcommand -> the Hydra app whose overrides complete its arguments (`prefopt data` takes train's); the others
# (plot, report, export, worker) take paths: no words, and the completion script falls back to file names
COMPLETED_BY_APP = {"train": "train", "eval": "eval", "inspect": "inspect", "toy": "toy", "data": "train"}


def completion_query(argv: list[str]) -> int:
    """`prefopt --shell-completion install=bash` prints Hydra's completion script, bound to `prefopt`. The script then
    calls `prefopt -sc query=bash` with the whole line in COMP_LINE: on the subcommand word every subcommand is
    offered; after it, the subcommand word is dropped from the line so Hydra completes that app's overrides."""
    if not any(arg.startswith("query=") for arg in argv):  # install=bash, uninstall=bash, install=fish, ...
        return run_hydra_app("train", argv)
    words = os.environ.get("COMP_LINE", "").split(" ", 2)
    if len(words) < 3:  # `prefopt ` or `prefopt tr`: the shell keeps the words that start with what is typed
        print("\n".join(COMMANDS))
        return 0
    app = COMPLETED_BY_APP.get(words[1])
    if app is None:
        return 0
    os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]])
    os.environ["COMP_POINT"] = str(max(0, int(os.environ.get("COMP_POINT", "0")) - len(words[1]) - 1))
    return run_hydra_app(app, argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-sc", "--shell-completion"):
        return completion_query(argv)
    handler = COMMANDS.get(argv[0])
    if handler is None:
        print(f"prefopt: unknown command '{argv[0]}'\n\n{usage()}", file=sys.stderr)
        return 2
    return handler(argv[1:])


if __name__ == "__main__":
    # `python -m prefopt.cli`: run the module Hydra looks the callback up in (prefopt.cli.CreateOutputDir reads
    # running_app), not this second copy named __main__
    from prefopt.cli import main as package_main

    sys.exit(package_main())
