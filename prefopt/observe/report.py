"""`prefopt report SWEEP_DIR`: one row per job of a Hydra multirun (job dirs 0, 1, 2, ...) with how each
run moved the probe log-probs (chosen, rejected, others, greedy) and its final eval reward accuracy.

Writes report.md, report.csv and the overlay plot report.png into the sweep dir and prints the table.
A job that crashed (no summary.json, or an error.txt) is a `failed` row, never a crash of the report. An
interrupted sweep lists every job it planned (Hydra's multirun.yaml: the basic sweeper's cartesian product of
the sweep's overrides): a job whose run dir lock is held is `running`, one without a dir `never ran`
(prefopt/observe/sweep_status.py reads the rows).

`--group-by KEYS` adds evidence over seeds: jobs that differ only in trainer.seed form a group, and each
group gets n, mean, std and a 95% Student-t interval for every metric (prefopt/observe/stats.py);
`--baseline KEY=VALUE` adds each group's paired difference to that group, seed by seed. Writes
report_groups.md, report_groups.csv and report_bands.png (mean trajectory and band per group).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from prefopt.core.errors import ConfigError
from prefopt.core.fileutil import atomic_write_text
from prefopt.core.runfiles import (
    CONFIG_FILE,
    DYNAMICS_FILE,
    HYDRA_RECORD,
    METRICS_FILE,
    REPORT_BANDS_PLOT,
    REPORT_CSV,
    REPORT_GROUPS_CSV,
    REPORT_GROUPS_MD,
    REPORT_MD,
    REPORT_PLOT,
)
from prefopt.observe.plots import BAND_PANELS, Band, GroupBands, RunDirError, plot_bands, plot_runs, run_overrides
from prefopt.observe.stats import Estimate, PairedDifference, estimate, paired_difference, sorted_seeds
from prefopt.observe.sweep_status import (
    NEVER_RAN,
    RUNNING,
    SUMMARY_COLUMNS,
    job_dirs,
    job_failed,
    load_yaml,
    read_summary,  # noqa: F401
    sweep_rows,
)  # job_dirs: re-exported for tests
from prefopt.observe.tracking import read_jsonl

COLUMNS = ("job", "overrides", *SUMMARY_COLUMNS, "status")


def plot_labels(jobs: list[Path]) -> list[str]:
    """`job N: <the overrides not shared by every job>`: a sweep's legend shows what differs, not ten
    repeats of the common settings."""
    overrides = [run_overrides(job) for job in jobs]
    shared = set.intersection(*(set(items) for items in overrides)) if len(jobs) > 1 else set()
    return [
        f"job {job.name}: " + " ".join(item for item in items if item not in shared)
        for job, items in zip(jobs, overrides)
    ]


def format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row[column]).replace("|", "\\|") for column in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({column: "" if row[column] is None else row[column] for column in COLUMNS} for row in rows)
    return buffer.getvalue()


def build_report(sweep_dir: Path) -> tuple[list[dict[str, Any]], Optional[Path]]:
    """(rows, path of report.png or None when no job recorded dynamics); writes report.md/.csv/.png."""
    sweep_dir = Path(sweep_dir)
    rows, jobs = sweep_rows(sweep_dir)
    atomic_write_text(sweep_dir / REPORT_MD, f"# Sweep report: {sweep_dir}\n\n" + markdown_table(rows))
    atomic_write_text(sweep_dir / REPORT_CSV, csv_text(rows))
    with_dynamics = [job for job in jobs if read_jsonl(job / DYNAMICS_FILE)]
    plot = None
    if with_dynamics:
        plot = plot_runs(
            with_dynamics,
            sweep_dir / REPORT_PLOT,
            f"Learning dynamics: sweep {sweep_dir.name}",
            plot_labels(with_dynamics),
        )
    return rows, plot


# ---- groups over seeds (--group-by, --baseline) ----------------------------------------------------

SEED_KEY = "trainer.seed"
GATE_MEAN_KEY = "train/gate/mean"
# the markdown table's columns; report_groups.csv has every metric
HEADLINE_METRICS = (
    "delta/chosen",
    "delta/rejected",
    "delta/others",
    "delta/greedy",
    "eval/rewards/accuracies",
    GATE_MEAN_KEY,
)
ALWAYS_SHOWN = HEADLINE_METRICS[:-1]  # the gate column only appears when some group ran with a gate
GROUP_CSV_STATS = ("n", "mean", "std", "ci_low", "ci_high")
NO_INTERVAL = "n<2: no interval"


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


def steps_in_order(rows: list[dict]) -> list[dict]:
    """Rows sorted by step, one per step (the last written wins)."""
    return sorted({row["step"]: row for row in rows if "step" in row}.values(), key=lambda row: row["step"])


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def job_metrics(summary: dict[str, Any], dynamics: list[dict], metrics_rows: list[dict]) -> dict[str, float]:
    """Every number a group's statistics cover: the summary's eval/* (final eval, eval/delta/*, greedy
    accuracy) and delta/* keys; the first-to-last change of every probe metric in dynamics.jsonl
    (delta/<type> for the summed log-prob, delta/<type>/logp_mean, delta/mass/*); and train/gate/mean,
    the gate averaged over the run's logged steps (how much of the rejected-side gradient got through)."""
    metrics = probe_deltas(dynamics)
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


def split_keys(values: Optional[list[str]]) -> list[str]:
    """`--group-by loss,loss.gate.kind --group-by loss.beta` -> [loss, loss.gate.kind, loss.beta]."""
    keys: list[str] = []
    for value in values or []:
        for key in (part.strip() for part in value.split(",")):
            if key and key not in keys:
                keys.append(key)
    return keys


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
                    f"jobs {first.number} and {job.number} (group {group.label}) differ in {key} ({key}={expected.text} vs "
                    f"{key}={found.text}), not only in {SEED_KEY}: add {key} to --group-by, or report those jobs apart"
                )
    seen: dict[Any, Job] = {}
    for job in group.jobs:
        seed = job_seed(job)
        if seed in seen:
            raise ConfigError(
                f"jobs {seen[seed].number} and {job.number} (group {group.label}) are the same setting with the same "
                f"{SEED_KEY}={job_setting(job, SEED_KEY).text}: a repeated seed is not a new sample and would "
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
        raise ConfigError(
            f"--baseline {shown}: no group has these values; the groups are: {'; '.join(group.label for group in groups)}"
        )
    strata_keys = [key for key in group_by if key not in wanted]
    stratum = lambda group: tuple(dict(group.settings)[key].value for key in strata_keys)  # noqa: E731
    baseline_of_stratum = {stratum(group): group for group in matches}  # unique: groups differ in some group-by key
    return {
        group.label: baseline_of_stratum[stratum(group)] for group in groups if stratum(group) in baseline_of_stratum
    }


def format_estimate(value: Optional[Estimate]) -> str:
    """`mean ± half-width` of the 95% interval; one seed has no interval, and says so."""
    if value is None or value.n == 0:
        return ""
    if value.half_width is None:
        return f"{value.mean:.3f} ({NO_INTERVAL})"
    return f"{value.mean:.3f} ± {value.half_width:.3f}"


def format_dropped(seeds: list) -> str:
    if not seeds:
        return "0"
    return f"{len(seeds)} (seed{'s' if len(seeds) > 1 else ''} {', '.join(str(seed) for seed in seeds)})"


def headline_metrics(estimates: list[dict[str, Estimate]]) -> list[str]:
    shown = set().union(*estimates) if estimates else set()
    return [name for name in HEADLINE_METRICS if name in ALWAYS_SHOWN or name in shown]


def markdown_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def groups_markdown(sweep_dir: Path, groups: list[Group], group_by: list[str], baselines: dict[str, Group]) -> str:
    """The groups table (and the paired-differences table against the baseline) with how to read them."""
    estimates = [group_estimates(group) for group in groups]
    metrics = headline_metrics(estimates)
    finished, failed = sum(len(group.jobs) for group in groups), sum(len(group.failed) for group in groups)
    lines = [
        f"# Sweep groups: {sweep_dir}",
        "",
        f"Grouped by {', '.join(group_by)}: {len(groups)} groups, {finished} finished jobs, {failed} failed (not counted). "
        f"Each cell: mean ± half-width of the 95% Student-t confidence interval over seeds ({SEED_KEY}), n-1 degrees of "
        f"freedom; {NO_INTERVAL}. Deltas are summed log-probs (nats), first to last probe evaluation.",
        "",
        markdown_row(["group", "n", *metrics, "failed"]),
        "|" + "---|" * (len(metrics) + 3),
    ]
    for group, values in zip(groups, estimates):
        lines.append(
            markdown_row(
                [
                    group.label,
                    len(group.jobs),
                    *(format_estimate(values.get(name)) for name in metrics),
                    len(group.failed),
                ]
            )
        )
    if baselines:
        shown = sorted({baseline.label for baseline in baselines.values()})
        lines += [
            "",
            f"## Paired differences vs {'; '.join(shown)}",
            "",
            f"Group minus its baseline per {SEED_KEY} both have; mean ± half-width of the 95% Student-t interval over the pairs. "
            "Seeds only one side has are dropped (counted).",
            "",
            markdown_row(["group", "baseline", "pairs", "dropped", *metrics]),
            "|" + "---|" * (len(metrics) + 4),
        ]
        for group in groups:
            baseline = baselines.get(group.label)
            if baseline is None or baseline is group:
                continue
            differences = paired_differences(group, baseline)
            seeds, baseline_seeds = {job_seed(job) for job in group.jobs}, {job_seed(job) for job in baseline.jobs}
            cells = (format_estimate(differences[name].estimate) if name in differences else "" for name in metrics)
            lines.append(
                markdown_row(
                    [
                        group.label,
                        baseline.label,
                        len(seeds & baseline_seeds),
                        format_dropped(sorted_seeds(seeds ^ baseline_seeds)),
                        *cells,
                    ]
                )
            )
    return "\n".join(lines) + "\n"


GROUP_CSV_COLUMNS = ("group", "compared_to", "metric", *GROUP_CSV_STATS, "dropped_seeds")


def groups_csv(groups: list[Group], group_by: list[str], baselines: dict[str, Group]) -> str:
    """Every metric of every group, one row each (n, mean, std, ci_low, ci_high), then the paired
    differences (compared_to = the baseline group); a column per group-by key for filtering."""
    columns = [GROUP_CSV_COLUMNS[0], *group_by, *GROUP_CSV_COLUMNS[1:]]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()

    def write(group: Group, compared_to: str, name: str, value: Estimate, dropped: str = "") -> None:
        cells = {"group": group.label, "compared_to": compared_to, "metric": name, "dropped_seeds": dropped}
        cells |= {key: setting.text for key, setting in group.settings}
        cells |= {stat: "" if getattr(value, stat) is None else getattr(value, stat) for stat in GROUP_CSV_STATS}
        writer.writerow(cells)

    for group in groups:
        for name, value in group_estimates(group).items():
            write(group, "", name, value)
    for group in groups:
        baseline = baselines.get(group.label)
        if baseline is not None and baseline is not group:
            for name, difference in paired_differences(group, baseline).items():
                write(group, baseline.label, name, difference.estimate, str(len(difference.dropped_seeds)))
    return buffer.getvalue()


MAX_BAND_FACETS = 4  # rows of panels in the band plot: more would make each too small to read


def band_facet_key(groups: list[Group], group_by: list[str]) -> Optional[str]:
    """The group-by key whose values become the band plot's rows: the last one, when there are several keys
    and it takes 2 to MAX_BAND_FACETS values (a study's regimes); None: every group in one set of panels."""
    if len(group_by) < 2:
        return None
    values = {dict(group.settings)[group_by[-1]].text for group in groups}
    return group_by[-1] if 2 <= len(values) <= MAX_BAND_FACETS else None


def group_bands(group: Group, facet_key: Optional[str] = None) -> GroupBands:
    """The group's probe trajectories: at each step, mean and 95% t interval over the seeds that have it;
    with `facet_key`, drawn in that key's row of panels and named by its other settings."""
    bands = {}
    for _, key in BAND_PANELS:
        by_step: dict[int, list[float]] = {}
        for job in group.jobs:
            for row in job.dynamics:
                if is_number(row.get(key)):
                    by_step.setdefault(row["step"], []).append(row[key])
        estimates = [(step, estimate(values)) for step, values in sorted(by_step.items())]
        bands[key] = Band(
            steps=[step for step, _ in estimates],
            mean=[value.mean for _, value in estimates],
            low=[math.nan if value.ci_low is None else value.ci_low for _, value in estimates],
            high=[math.nan if value.ci_high is None else value.ci_high for _, value in estimates],
        )
    seeds = f"(n={len(group.jobs)})"
    if facet_key is None:
        return GroupBands(f"{group.label} {seeds}", bands)
    facet = " ".join(f"{key}={setting.text}" for key, setting in group.settings if key == facet_key)
    series = " ".join([f"{key}={setting.text}" for key, setting in group.settings if key != facet_key] + [seeds])
    return GroupBands(f"{group.label} {seeds}", bands, facet=facet, series=series)


@dataclass
class GroupReport:
    groups: list[Group]
    baselines: dict[str, Group]  # group label -> the group it is compared with
    markdown: str
    plot: Optional[Path]  # report_bands.png, None when no finished job recorded dynamics


def build_group_report(sweep_dir: Path, group_by: list[str], baseline: Optional[list[str]] = None) -> GroupReport:
    """Group the sweep's jobs by `group_by` and write report_groups.md, report_groups.csv and report_bands.png."""
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(job_dir) for job_dir in job_dirs(sweep_dir)]
    groups = group_jobs(jobs, group_by)
    baselines = find_baselines(groups, baseline, group_by)
    markdown = groups_markdown(sweep_dir, groups, group_by, baselines)
    atomic_write_text(sweep_dir / REPORT_GROUPS_MD, markdown)
    atomic_write_text(sweep_dir / REPORT_GROUPS_CSV, groups_csv(groups, group_by, baselines))
    with_dynamics = [group for group in groups if any(job.dynamics for job in group.jobs)]
    plot = None
    if with_dynamics:
        facet_key = band_facet_key(with_dynamics, group_by)
        plot = plot_bands([group_bands(group, facet_key) for group in with_dynamics], sweep_dir / REPORT_BANDS_PLOT)
    return GroupReport(groups, baselines, markdown, plot)


def report_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="prefopt report",
        description="Tabulate a sweep (prefopt train -m): per job the probe log-prob changes, eval accuracy and status; "
        "writes report.md, report.csv and report.png into the sweep dir. With --group-by: statistics over seeds per group "
        "(n, mean, std, 95% Student-t interval) in report_groups.md, report_groups.csv and report_bands.png.",
    )
    parser.add_argument(
        "sweep_dir", metavar="SWEEP_DIR", type=Path, help="the multirun dir holding job dirs 0, 1, 2, ..."
    )
    parser.add_argument(
        "--group-by",
        action="append",
        metavar="KEYS",
        help="config keys whose values define a group, comma-separated or repeated (e.g. loss,loss.gate.kind); "
        f"the jobs of a group must differ only in {SEED_KEY}",
    )
    parser.add_argument(
        "--baseline",
        action="append",
        metavar="KEY=VALUE",
        help="the group the others are compared with, seed by seed (e.g. loss=dpo); needs --group-by. Keys it does "
        "not name stratify: each group is compared with the baseline that shares their values",
    )
    args = parser.parse_args(argv)
    group_by = split_keys(args.group_by)
    if args.baseline and not group_by:
        print("prefopt: error: --baseline needs --group-by (e.g. --group-by loss --baseline loss=dpo)", file=sys.stderr)
        return 2
    try:
        groups = (
            build_group_report(args.sweep_dir, group_by, args.baseline) if group_by else None
        )  # refuses before writing the rest
        rows, plot = build_report(args.sweep_dir)
    except (RunDirError, ConfigError) as error:
        print(f"prefopt: error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    written = [REPORT_MD, REPORT_CSV] + ([REPORT_PLOT] if plot else [])
    if groups is not None:
        print(groups.markdown)
        written += [REPORT_GROUPS_MD, REPORT_GROUPS_CSV] + ([REPORT_BANDS_PLOT] if groups.plot else [])
    failed = sum(row["status"] == "failed" for row in rows)
    unfinished = [
        f"{sum(row['status'] == status for row in rows)} {status}"
        for status in (RUNNING, NEVER_RAN)
        if any(row["status"] == status for row in rows)
    ]
    no_plot = "" if plot else " (no dynamics.jsonl: no plot)"
    print(
        f"{len(rows)} jobs, {', '.join([f'{failed} failed', *unfinished])}; wrote {', '.join(written)}{no_plot} in {args.sweep_dir}"
    )
    return 0
