"""The jobs of a sweep grouped for statistics over seeds (`prefopt report --group-by KEYS [--baseline KEY=VALUE]`):
each job dir read once (its overrides, frozen config, Hydra's group choices, summary and probe trajectories), jobs
that differ only in trainer.seed grouped by their values of the group-by keys, each group's estimates per metric
(prefopt/observe/stats.py) and its paired differences, seed by seed, with the baseline group it is compared with.

prefopt/observe/group_report.py writes the tables and the band plot from these groups.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from prefopt.core.errors import ConfigError
from prefopt.core.runfiles import CONFIG_FILE, DYNAMICS_FILE, HYDRA_RECORD, METRICS_FILE
from prefopt.observe.plots import RunDirError, run_overrides
from prefopt.observe.stats import Estimate, PairedDifference, estimate, paired_difference
from prefopt.observe.sweep_status import job_failed, load_yaml, read_summary
from prefopt.observe.tracking import read_jsonl

SEED_KEY = "trainer.seed"
GATE_MEAN_KEY = "train/gate/mean"
TERM_GRADIENT_PREFIX = "dynamics/grad/"  # dynamics.term_grads' numbers (prefopt/train/term_grads.py)
RUN_MEAN_SUFFIX = "_mean"  # a term-gradient number averaged over a run's probe steps after step 0


@dataclass(frozen=True)
class Setting:
    """A job's value for one config key: `value` compares (canonical JSON), `text` shows it."""

    value: str
    text: str


ABSENT = Setting("(absent)", "(absent)")  # not valid JSON: never equal to a real value, null included


@dataclass
class Job:
    """One job dir, read once: what grouping, statistics and the band plot need."""

    dir: Path
    overrides: dict[str, str]  # override key (without +, ++, ~) -> the value text as typed
    config: Optional[dict]  # the frozen config.yaml: the defaults a job ran with where it set nothing
    choices: dict[str, str]  # Hydra's config-group choices (loss -> gate_dpo, loss/gate -> default)
    failed: bool
    metrics: dict[str, float]  # every number the statistics cover (job_metrics)
    dynamics: list[dict]  # dynamics.jsonl rows in step order

    @property
    def number(self) -> int:
        return int(self.dir.name)


@dataclass
class Group:
    """The finished jobs (one per seed) and failed jobs that share the values of the group-by keys."""

    settings: tuple[tuple[str, Setting], ...]  # (group-by key, setting), in --group-by order
    jobs: list[Job] = field(default_factory=list)
    failed: list[Job] = field(default_factory=list)

    @property
    def label(self) -> str:
        return " ".join(f"{key}={setting.text}" for key, setting in self.settings)


@functools.cache
def overrides_parser() -> OverridesParser:
    return OverridesParser.create()


def override_items(items: Iterable[str]) -> dict[str, str]:
    """`loss.beta=0.1` -> {"loss.beta": "0.1"}: key (`+experiment=x` -> experiment) to the value as typed."""
    parsed = {}
    for item in items:
        key, _, text = item.partition("=")
        try:
            key = overrides_parser().parse_override(item).key_or_group
        except HydraException:  # not Hydra syntax (an overrides.yaml written by hand): key up to the `=`
            key = key.lstrip("+~")
        parsed[key.strip()] = text.strip()
    return parsed


def parse_value(text: str) -> Any:
    """An override's value as Hydra reads it (`1e-1` is 0.1, `off` is text, `'0.1'` is text, `null` None),
    so `loss.beta=1e-1` equals config.yaml's `beta: 0.1`; text Hydra cannot parse stays text."""
    try:
        return overrides_parser().parse_override(f"value={text}").value()
    except HydraException:
        return text


def canonical(value: Any) -> str:
    """A comparable text for a value: 1 and 1.0 compare equal (`loss.beta=1` vs the float schema's 1.0)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True, default=str)


def shown_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def select(config: Optional[dict], key: str) -> Any:
    """config["a"]["b"] for key "a.b"; ABSENT when any level is missing."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return ABSENT
        node = node[part]
    return node


def job_setting(job: Job, key: str) -> Setting:
    """What the job ran with for `key`: its command-line override; else, for a config group (`loss`), the
    choice Hydra recorded; else the value in its frozen config.yaml, i.e. the default it did not override."""
    if key in job.overrides:
        text = job.overrides[key]
        return Setting(canonical(parse_value(text)), text)
    choice = job.choices.get(key.replace(".", "/"))
    if choice is not None:
        return Setting(canonical(choice), str(choice))
    value = select(job.config, key)
    return ABSENT if value is ABSENT else Setting(canonical(value), shown_value(value))


def job_seed(job: Job) -> Any:
    """The job's trainer.seed, what paired differences match on: an int (so seeds sort as numbers), or
    the canonical text of whatever else it is."""
    value = job_setting(job, SEED_KEY).value
    return int(value) if value.lstrip("-").isdigit() else value


def read_job(job_dir: Path) -> Job:
    """Everything grouping needs from one job dir; a damaged file is a RunDirError naming it."""
    summary = read_summary(job_dir)
    hydra_record = load_yaml(job_dir / HYDRA_RECORD)
    choices = select(hydra_record, "hydra.runtime.choices")
    # a job that failed validation never wrote overrides.yaml; Hydra recorded its overrides before it ran
    hydra_overrides = select(hydra_record, "hydra.overrides.task")
    overrides = run_overrides(job_dir) or (hydra_overrides if isinstance(hydra_overrides, list) else [])
    try:
        dynamics, metrics_rows = steps_in_order(read_jsonl(job_dir / DYNAMICS_FILE)), read_jsonl(job_dir / METRICS_FILE)
    except ValueError as error:  # a bad line before the last one: the message names the file and line
        raise RunDirError(str(error)) from None
    return Job(
        dir=job_dir,
        overrides=override_items(str(item) for item in overrides),
        config=load_yaml(job_dir / CONFIG_FILE),
        choices={str(key): str(value) for key, value in choices.items()} if isinstance(choices, dict) else {},
        failed=job_failed(job_dir, summary),
        metrics=job_metrics(summary or {}, dynamics, metrics_rows),
        dynamics=dynamics,
    )


def planned_job(overrides: list[str]) -> Job:
    """A job a sweep planned that never ran (no dir): only its overrides are known."""
    return Job(Path(), override_items(overrides), None, {}, failed=True, metrics={}, dynamics=[])


def steps_in_order(rows: list[dict]) -> list[dict]:
    """Rows sorted by step, one per step (the last written wins)."""
    return sorted({row["step"]: row for row in rows if "step" in row}.values(), key=lambda row: row["step"])


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def job_metrics(summary: dict[str, Any], dynamics: list[dict], metrics_rows: list[dict]) -> dict[str, float]:
    """Every number a group's statistics cover: the summary's eval/* (final eval, eval/delta/*, greedy
    accuracy) and delta/* keys; the first-to-last change of every probe metric in dynamics.jsonl
    (delta/<type> for the summed log-prob, delta/<type>/logp_mean, delta/mass/*); the per-term gradient
    norms averaged over the probe steps after step 0 (dynamics/grad/<name>_mean); and train/gate/mean,
    the gate averaged over the run's logged steps (how much of the rejected-side gradient got through)."""
    metrics = probe_deltas(dynamics) | term_gradient_means(dynamics)
    metrics |= {
        key: float(value) for key, value in summary.items() if key.startswith(("eval/", "delta/")) and is_number(value)
    }
    gate = [row[GATE_MEAN_KEY] for row in metrics_rows if is_number(row.get(GATE_MEAN_KEY))]
    if gate:
        metrics[GATE_MEAN_KEY] = math.fsum(gate) / len(gate)
    return metrics


def probe_deltas(dynamics: list[dict]) -> dict[str, float]:
    """last - first probe evaluation of every dynamics/* number; `dynamics/chosen/logp` -> `delta/chosen`,
    the summary's own name for it."""
    if len(dynamics) < 2:
        return {}
    first, last = dynamics[0], dynamics[-1]
    deltas = {}
    for key, value in last.items():
        if key.startswith("dynamics/") and is_number(value) and is_number(first.get(key)):
            name = key.removeprefix("dynamics/").removesuffix("/logp")
            deltas[f"delta/{name}"] = value - first[key]
    return deltas


def term_gradient_means(dynamics: list[dict]) -> dict[str, float]:
    """`dynamics/grad/chosen_norm` -> `dynamics/grad/chosen_norm_mean`: each per-term gradient number
    (dynamics.term_grads) averaged over the probe steps after step 0. Step 0 is left out because every seed
    starts from the same weights there, so it says nothing of what a setting does; a last-minus-first change
    would hang on one noisy probe step."""
    values: dict[str, list[float]] = {}
    for row in dynamics:
        if row["step"] > 0:
            for key, value in row.items():
                if key.startswith(TERM_GRADIENT_PREFIX) and is_number(value):
                    values.setdefault(key, []).append(value)
    return {f"{key}{RUN_MEAN_SUFFIX}": math.fsum(series) / len(series) for key, series in values.items()}


def group_jobs(jobs: list[Job], group_by: list[str]) -> list[Group]:
    """Jobs grouped by their values of the group-by keys, in job order; refuses a group whose finished
    jobs differ in anything but trainer.seed, or repeat a seed (ConfigError naming the key or jobs)."""
    check_group_keys(jobs, group_by)
    groups: dict[tuple, Group] = {}
    for job in jobs:
        settings = tuple((key, job_setting(job, key)) for key in group_by)
        group = groups.setdefault(tuple(setting.value for _, setting in settings), Group(settings))
        (group.failed if job.failed else group.jobs).append(job)
    for group in groups.values():
        check_only_seeds_differ(group, group_by)
    return list(groups.values())


def check_group_keys(jobs: list[Job], group_by: list[str]) -> None:
    if not group_by:
        raise ConfigError("--group-by needs at least one config key, e.g. --group-by loss")
    for key in group_by:
        if all(job_setting(job, key) is ABSENT for job in jobs):
            overridden = sorted({name for job in jobs for name in job.overrides})
            raise ConfigError(
                f"--group-by {key}: no job sets it (not in any job's overrides.yaml or config.yaml); "
                f"the jobs override: {', '.join(overridden) or 'nothing'}"
            )


def check_only_seeds_differ(group: Group, group_by: list[str]) -> None:
    """Statistics over seeds are only sound when the seed is all that varies: every key any job of the
    group overrides (each job's own default where it does not) must agree, and no seed may repeat.
    Only the overrides are compared: config.yaml also holds per-run fields (run_dir, W&B name) and what
    hardware=auto chose on the machine, which differ between identical settings."""
    if not group.jobs:
        return
    first, *others = group.jobs
    keys = sorted({key for job in group.jobs for key in job.overrides} - {SEED_KEY, *group_by})
    for job in others:
        for key in keys:
            expected, found = job_setting(first, key), job_setting(job, key)
            if expected.value != found.value:
                raise ConfigError(
                    f"jobs {first.dir.name} and {job.dir.name} (group {group.label}) differ in {key} "
                    f"({key}={expected.text} vs {key}={found.text}), not only in {SEED_KEY}: add {key} to --group-by, "
                    "or report those jobs apart"
                )
    seen: dict[Any, Job] = {}
    for job in group.jobs:
        seed = job_seed(job)
        if seed in seen:
            raise ConfigError(
                f"jobs {seen[seed].dir.name} and {job.dir.name} (group {group.label}) are the same setting with the "
                f"same {SEED_KEY}={job_setting(job, SEED_KEY).text}: a repeated seed is not a new sample and would "
                "narrow the interval falsely; report a sweep whose jobs have distinct seeds"
            )
        seen[seed] = job


def group_estimates(group: Group) -> dict[str, Estimate]:
    """Per metric, the estimate over the group's finished jobs (n counts the jobs that have the metric)."""
    names = sorted({name for job in group.jobs for name in job.metrics})
    return {name: estimate([job.metrics[name] for job in group.jobs if name in job.metrics]) for name in names}


def paired_differences(group: Group, baseline: Group) -> dict[str, PairedDifference]:
    """Per metric, group - baseline matched by trainer.seed; a seed either side lacks is dropped."""
    names = sorted(
        {name for job in group.jobs for name in job.metrics} | {name for job in baseline.jobs for name in job.metrics}
    )
    by_seed = lambda jobs, name: {job_seed(job): job.metrics[name] for job in jobs if name in job.metrics}  # noqa: E731
    return {name: paired_difference(by_seed(group.jobs, name), by_seed(baseline.jobs, name)) for name in names}


def find_baselines(groups: list[Group], baseline: Optional[list[str]], group_by: list[str]) -> dict[str, Group]:
    """Group label -> the group it is compared with: the one whose settings match `--baseline key=value[,...]`
    (values compared as Hydra reads them) and share the group's values of the group-by keys --baseline does not
    name. `--group-by loss,dataset.arith.rejected_style --baseline loss=dpo` compares every loss with dpo in the
    same regime; naming every key gives one baseline for all."""
    if not baseline:
        return {}
    wanted = override_items(item for value in baseline for item in value.split(",") if item.strip())
    for key, text in wanted.items():
        if key not in group_by or not text:
            raise ConfigError(
                f"--baseline {key}={text}: give KEY=VALUE with KEY one of the --group-by keys ({', '.join(group_by)})"
            )
    matches = [
        group
        for group in groups
        if all(dict(group.settings)[key].value == canonical(parse_value(text)) for key, text in wanted.items())
    ]
    if not matches:
        shown = ",".join(f"{key}={text}" for key, text in wanted.items())
        labels = "; ".join(group.label for group in groups)
        raise ConfigError(f"--baseline {shown}: no group has these values; the groups are: {labels}")
    strata_keys = [key for key in group_by if key not in wanted]
    stratum = lambda group: tuple(dict(group.settings)[key].value for key in strata_keys)  # noqa: E731
    baseline_of_stratum = {stratum(group): group for group in matches}  # unique: groups differ in some group-by key
    return {
        group.label: baseline_of_stratum[stratum(group)] for group in groups if stratum(group) in baseline_of_stratum
    }
