"""`prefopt examples`: the runnable recipes ship inside the package (prefopt/examples/; a clone's top-level examples/
links there, as conf/ does), so an installed wheel has them too. They are listed with each script's one-line purpose
(the first line of its header, so the scripts stay the one place that says it), copied into a directory of the
user's (a file that differs is never overwritten unless forced; every write atomic), or run in place. A script finds
its sample data beside itself and writes its run dirs under the caller's working directory, so the same script runs
from a clone, from site-packages and from a copy. Light imports only: the command answers at once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from prefopt.core.errors import ConfigError, closest
from prefopt.core.fileutil import atomic_write_bytes

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
DATA_DIR = "data"  # the sample data beside the scripts; copied with any of them (a few KB)
DEFAULT_COPY_DIR = "prefopt-examples"
SCRIPT_MODE, DATA_MODE = 0o777, 0o666  # less the umask: scripts stay executable, as in the package


@dataclass(frozen=True)
class Example:
    name: str  # the script's name without .sh
    script: Path
    purpose: str  # the first line of the script's header


def shipped_examples() -> list[Example]:
    return [Example(script.stem, script, header_purpose(script)) for script in sorted(EXAMPLES_DIR.glob("*.sh"))]


def header_purpose(script: Path) -> str:
    """The first comment line after the shebang: each example's header opens with its purpose."""
    for line in script.read_text().splitlines()[1:]:
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("# ").strip()
    return ""


def find_example(name: str) -> Example:
    """The example called `name` (with or without .sh); an unknown name is a one-line error with a suggestion."""
    examples = {example.name: example for example in shipped_examples()}
    wanted = Path(name).name.removesuffix(".sh")
    if wanted in examples:
        return examples[wanted]
    close = closest(wanted, examples, count=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(f"no example '{name}': {hint}the examples are {', '.join(examples)} (`prefopt examples`)")


def listing() -> str:
    examples = shipped_examples()
    width = max(len(example.name) for example in examples)
    lines = [f"examples shipped with prefopt ({EXAMPLES_DIR}):"]
    lines += [f"  {example.name:<{width}}  {example.purpose}" for example in examples]
    lines += [
        "",
        "prefopt examples run NAME [OVERRIDES]      run one in place; its run dirs go under ./outputs/examples/",
        f"prefopt examples copy [NAME ...] [-o DIR]  copy scripts + sample data to edit (default ./{DEFAULT_COPY_DIR})",
        "Each script's header says what it shows, how to call it and how long it takes.",
    ]
    return "\n".join(lines)


def files_to_copy(names: list[str]) -> list[Path]:
    """The chosen scripts (all when none is named) and the sample data they read, as paths under EXAMPLES_DIR."""
    scripts = [find_example(name).script for name in names] if names else [e.script for e in shipped_examples()]
    data = sorted(path for path in (EXAMPLES_DIR / DATA_DIR).rglob("*") if path.is_file())
    return list(dict.fromkeys([*scripts, *data]))


def copy_examples(names: list[str], destination: Path, force: bool) -> list[str]:
    """Copy the examples into `destination`; one line per file (wrote / overwrote / unchanged). A target that exists
    and differs refuses the whole copy, before anything is written, unless `force`."""
    plan, refused = [], []
    for source in files_to_copy(names):
        target = destination / source.relative_to(EXAMPLES_DIR)
        content = source.read_bytes()
        if target.is_dir():
            raise ConfigError(f"{target} is a directory, where the example file {source.name} would go")
        state = "wrote" if not target.exists() else "unchanged" if target.read_bytes() == content else "overwrote"
        if state == "overwrote" and not force:
            refused.append(str(target))
        plan.append((source, target, content, state))
    if refused:
        raise ConfigError(
            f"nothing copied: these files exist and differ from the shipped ones: {', '.join(refused)} "
            "(--force overwrites them)"
        )
    lines = []
    for source, target, content, state in plan:
        if state != "unchanged":
            atomic_write_bytes(target, content, SCRIPT_MODE if source.suffix == ".sh" else DATA_MODE)
        lines.append(f"{state:<9} {target}")
    return lines


def this_prefopt() -> str:
    """The command that runs this very install of prefopt, for a script run by `prefopt examples run` (the scripts
    split $PREFOPT on spaces: an interpreter path holding one is left to the script's own search of PATH)."""
    return "" if " " in sys.executable else f"{sys.executable} -m prefopt.cli"


def run_example(name: str, arguments: list[str]) -> int:
    """`bash SCRIPT ARGUMENTS` in the caller's working directory with this install's prefopt; its exit code. Ctrl-C
    reaches the script too (one process group), which stops its runs itself: wait for it rather than kill it."""
    example = find_example(name)
    env = dict(os.environ)
    if not env.get("PREFOPT") and this_prefopt():
        env["PREFOPT"] = this_prefopt()
    print(f"running {example.script} (run dirs under {Path.cwd() / 'outputs' / 'examples'})", flush=True)
    process = subprocess.Popen(["bash", str(example.script), *arguments], env=env)
    while True:
        try:
            code = process.wait()
            return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention
        except KeyboardInterrupt:
            continue


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="prefopt examples",
        description="The runnable example recipes shipped with prefopt: list them (no command), run one in place, "
        "or copy them to edit. They read their sample data from beside themselves and write run dirs under the "
        "current directory (./outputs/examples/).",
    )
    commands = root.add_subparsers(dest="command")
    commands.add_parser("list", help="list the examples with their purpose (the default)")
    copy = commands.add_parser("copy", help=f"copy scripts and sample data into a directory (./{DEFAULT_COPY_DIR})")
    copy.add_argument("names", nargs="*", metavar="NAME", help="examples to copy (default: all)")
    copy.add_argument("-o", "--output", type=Path, default=Path(DEFAULT_COPY_DIR), help="where to (created)")
    copy.add_argument("--force", action="store_true", help="overwrite files that differ from the shipped ones")
    run = commands.add_parser("run", help="run one here with this install's prefopt: NAME [OVERRIDES]")
    run.add_argument("name", metavar="NAME")
    run.add_argument("arguments", nargs=argparse.REMAINDER, metavar="OVERRIDES", help="passed on to the script")
    return root


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "copy":
            print("\n".join(copy_examples(args.names, args.output, args.force)))
            first = find_example(args.names[0]).name if args.names else "gate_dpo_local"
            print(f"run one: bash {args.output / first}.sh   (run dirs under ./outputs/examples/)")
        elif args.command == "run":
            return run_example(args.name, args.arguments)
        else:
            print(listing())
    except (ConfigError, OSError) as error:
        print(f"prefopt: error: {error}", file=sys.stderr)
        return 2
    return 0
