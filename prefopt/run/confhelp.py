"""`prefopt train --help` (and eval's, inspect's, toy's) read from the YAML under conf/, without starting Hydra: the
config groups and their options, and every key with its default and the one-line comment the YAML gives it. Hydra's
own help takes seconds (it imports Hydra and composes) and shows ~200 lines of config without those comments.

The YAML is read line by line (`key: value  # comment`, nested by indentation): conf/ is written in that shape
(tests/test_config.py::test_every_yaml_key_has_a_comment holds it), and a line parser keeps `--help` instant.
Imports nothing heavy: cli.py calls it before Hydra is imported.
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prefopt.conf import CONF_DIR
from prefopt.core.errors import ConfigError, did_you_mean

GROUP_DIRS = ("loss", "model", "dataset", "hardware", "experiment", "hydra/launcher", "hydra/sweeper")
HIDDEN_SECTIONS = ("hydra.callbacks", "defaults")  # plumbing, not a user's setting
COMMAND_SECTIONS = ("eval",)  # root sections only their own command reads (inspect.* also steers dataset.filter)
WIDTH_FALLBACK = 120  # columns when stdout is not a terminal (a pipe, a test)


@dataclass(frozen=True)
class Key:
    name: str  # dotted: trainer.max_steps
    value: str  # as written in the YAML ('' for a section)
    comment: str  # the one-line comment ('' when none)


@dataclass(frozen=True)
class ConfigFile:
    description: str  # the file's first comment line (its header)
    defaults: tuple[str, ...]  # the defaults list's entries as written: 'loss: dpo', 'dpo', '_self_'
    keys: tuple[Key, ...]  # in file order, sections included (value '')


def split_comment(text: str) -> tuple[str, str]:
    """'3.0e-6  # peak learning rate' -> ('3.0e-6', 'peak learning rate'); a '#' inside a value (no space before it)
    stays in the value."""
    value, _, comment = text.partition(" #")
    return value.strip(), comment.strip()


def read_config_file(path: Path) -> ConfigFile:
    """The keys of one conf/ YAML file, read line by line (see the module docstring)."""
    description, defaults, keys = "", [], []
    stack: list[tuple[int, str]] = []  # (indent, section name) of the enclosing sections
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if not description and not keys and text and not text.startswith("@package"):
                description = text
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stripped.startswith("- "):  # a list item: only the defaults list's matter here
            if stack and stack[-1][1] == "defaults":
                defaults.append(split_comment(stripped[2:])[0])
            continue
        name, _, rest = stripped.partition(":")
        value, comment = split_comment(rest)
        dotted = ".".join([*(section for _, section in stack), name.strip()])
        keys.append(Key(dotted, value, comment))
        if not value:
            stack.append((indent, name.strip()))
    return ConfigFile(description, tuple(defaults), tuple(keys))


def group_options(group: str) -> list[str]:
    """conf/<group>/*.yaml, the default-worthy order: alphabetical."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def root_defaults(root: ConfigFile) -> dict[str, str]:
    """{'loss': 'dpo', ...}: the option each group of the root config starts from."""
    chosen = {}
    for entry in root.defaults:
        group, separator, option = entry.partition(":")
        if separator:
            chosen[group.strip()] = option.strip()
    return chosen


def option_keys(group: str, option: str, prefix: str) -> dict[str, Key]:
    """The keys an option of a group composes to, its own defaults list followed (another option of the group, or a
    subgroup such as loss/gate), later entries winning: {dotted key: Key}. `prefix` is the group's package."""
    path = CONF_DIR / group / f"{option}.yaml"
    if not path.is_file():
        raise ConfigError(f"no option {group}={option} ({did_you_mean(option, group_options(group))})")
    config = read_config_file(path)
    merged: dict[str, Key] = {}
    own = {f"{prefix}.{key.name}": Key(f"{prefix}.{key.name}", key.value, key.comment) for key in config.keys}
    for entry in config.defaults or ("_self_",):
        sub_group, separator, sub_option = (part.strip() for part in entry.partition(":"))
        if entry == "_self_":
            merged |= {name: merge_key(merged.get(name), key) for name, key in own.items()}
        elif separator:  # a subgroup: loss/gate -> loss.gate.*
            merged |= option_keys(f"{group}/{sub_group}", sub_option, f"{prefix}.{sub_group}")
        else:  # another option of this group, extended
            merged |= option_keys(group, entry, prefix)
    if "_self_" not in config.defaults and config.defaults:
        merged |= own
    return merged


def merge_key(earlier: Optional[Key], later: Key) -> Key:
    """A key an option sets again: its value, and its comment (or the earlier one when it gives none)."""
    if earlier is None or later.comment:
        return later
    return Key(later.name, later.value, earlier.comment)


# ---- the help text ------------------------------------------------------------------------------------------------


def terminal_width() -> int:
    return shutil.get_terminal_size((WIDTH_FALLBACK, 24)).columns


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(10, width - 1)] + "…"


def key_lines(keys: list[Key], width: int, whole: bool = False) -> list[str]:
    """'  trainer.lr=3.0e-6        peak learning rate', one line each (clipped to the width unless `whole`)."""
    shown = [key for key in keys if key.value and not key.name.startswith(HIDDEN_SECTIONS)]
    column = min(40, max((len(key.name) + len(key.value) + 1 for key in shown), default=0))
    lines = []
    for key in shown:
        line = f"  {key.name}={key.value}".ljust(column + 4) + key.comment
        if len(key.name) + len(key.value) + 1 > column:
            line = f"  {key.name}={key.value}  {key.comment}"
        lines.append(line if whole else clip(line, width))
    return lines


def groups_lines(root: ConfigFile, width: int) -> list[str]:
    defaults = root_defaults(root)
    lines = []
    for group in GROUP_DIRS:
        options = group_options(group)
        if not options:
            continue
        default = defaults.get(group)
        ordered = [f"{default} (default)"] + [option for option in options if option != default] if default else options
        prefix = "+" if group == "experiment" else ""  # not in the defaults list: added, not replaced
        lines += textwrap.wrap(
            " | ".join(ordered),
            width=width,
            initial_indent=f"  {prefix + group + '=':<16}",
            subsequent_indent=" " * 18,
            break_on_hyphens=False,
        )
    return lines


def command_keys(root: ConfigFile, command: str) -> list[Key]:
    """The root's keys `prefopt COMMAND` reads: eval.* only for `prefopt eval`."""
    return [key for key in root.keys if key.name.split(".")[0] not in COMMAND_SECTIONS or key.name.startswith(command)]


def usage_lines(command: str, summary: str, has_groups: bool) -> list[str]:
    groups = "[GROUP=OPTION ...] " if has_groups else ""
    usage = f"usage: prefopt {command} {groups}[KEY=VALUE ...] [-m] [--cfg job] [--help [TOPIC]]"
    return [f"prefopt {command}: {summary}", "", usage]


def main_help(command: str, summary: str, config_name: str) -> str:
    """The help of a Hydra app: usage, the groups and options, every key of the root config with its comment."""
    width = terminal_width()
    root = read_config_file(CONF_DIR / f"{config_name}.yaml")
    lines = usage_lines(command, summary, bool(root.defaults))
    if root.defaults:
        lines += [
            "",
            f"Config groups (GROUP=OPTION; `prefopt {command} --help GROUP` describes each option and its keys):",
            *groups_lines(root, width),
        ]
    keys = command_keys(root, command)
    first_section = next((key.name for key in keys if not key.value and key.name not in HIDDEN_SECTIONS), None)
    example = f", e.g. --help {first_section}," if first_section else ""
    lines += [
        "",
        f"Keys (KEY=VALUE, shown with their defaults; `prefopt {command} --help SECTION`{example} shows a section's"
        " comments whole):",
        *key_lines(keys, width),
        "",
        "Hydra: --cfg job prints the composed config (resolved), -m sweeps (KEY=a,b: a job each), --hydra-help its",
        "options, --shell-completion install=bash completes keys and options; --config-dir DIR --config-name NAME runs",
        'your own config file (README: "Your own config file").',
    ]
    return "\n".join(lines)


def group_help(command: str, group: str, option: Optional[str], config_name: str) -> str:
    """`--help loss`: each option with its header line, then the keys of the default option (or of `--help
    loss=gate_dpo`'s)."""
    width = terminal_width()
    options = group_options(group)
    default = root_defaults(read_config_file(CONF_DIR / f"{config_name}.yaml")).get(group)
    lines = [f"prefopt {command} {'+' if group == 'experiment' else ''}{group}=OPTION (conf/{group}/):"]
    column = max(len(name) for name in options) + 4
    for name in options:
        description = read_config_file(CONF_DIR / group / f"{name}.yaml").description
        mark = " (default)" if name == default else ""
        lines.append(clip(f"  {name:<{column}}{description}{mark}", width))
    shown = option or default
    if shown and group not in ("experiment",) and not group.startswith("hydra/"):
        keys = list(option_keys(group, shown, group.replace("/", ".")).values())
        lines += ["", f"Keys of {group}={shown} (`prefopt {command} --help {group}=OPTION` for another option's):"]
        lines += key_lines(keys, width)
    return "\n".join(lines)


def section_help(command: str, section: str, config_name: str) -> str:
    """`--help trainer`: the section's keys with their comments whole."""
    keys = [key for key in read_config_file(CONF_DIR / f"{config_name}.yaml").keys if key.name.startswith(section)]
    return "\n".join([f"prefopt {command}: {section}.*", *key_lines(keys, terminal_width(), whole=True)])


OWN_CONFIG_FLAGS = ("--config-name", "-cn", "--config-dir", "-cd", "--config-path", "-cp")


def help_topic(argv: list[str]) -> tuple[bool, Optional[str]]:
    """(whether argv asks for prefopt's help, its topic): `--help`/`-h` anywhere, the word after it a topic (a group,
    `loss=gate_dpo`, a section). With a config file of the user's own (--config-name ...) Hydra's help describes it."""
    for index, arg in enumerate(argv):
        if arg in ("-h", "--help"):
            if any(flag in argv or any(a.startswith(flag + "=") for a in argv) for flag in OWN_CONFIG_FLAGS):
                return False, None
            following = argv[index + 1 : index + 2]
            return True, following[0] if following and not following[0].startswith("-") else None
    return False, None


def help_text(command: str, summary: str, config_name: str, topic: Optional[str] = None) -> str:
    """The help of `prefopt COMMAND --help [TOPIC]`: TOPIC a group (loss), a group's option (loss=gate_dpo) or a section
    of the root config (trainer, logger.wandb); none: the whole overview. An unknown topic: a ConfigError with the
    closest ones."""
    if topic is None:
        return main_help(command, summary, config_name)
    group, _, option = topic.partition("=")
    if group in GROUP_DIRS and group_options(group):
        return group_help(command, group, option or None, config_name)
    root = read_config_file(CONF_DIR / f"{config_name}.yaml")
    sections = sorted({key.name for key in root.keys if not key.value and key.name not in HIDDEN_SECTIONS})
    if topic in sections:
        return section_help(command, topic, config_name)
    known = [*GROUP_DIRS, *sections]
    raise ConfigError(f"--help {topic}: not a config group or section ({did_you_mean(topic, known)})")
