"""`prefopt report --group-by`'s files: report_groups.md (a row per group: n and the 95% Student-t interval of
each headline metric, then the paired differences against the baseline), report_groups.csv (every metric of every
group) and report_bands.png (each group's mean probe trajectory and its band), from prefopt/observe/seed_groups.py's
groups. With `--fit KEY`, the section "## Fit against KEY" in report_groups.md, report_fit.csv and report_fit.png
from prefopt/observe/fits.py's least-squares lines.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from prefopt.core.fileutil import atomic_write_text
from prefopt.core.runfiles import (
    REPORT_BANDS_PLOT,
    REPORT_FIT_CSV,
    REPORT_FIT_PLOT,
    REPORT_GROUPS_CSV,
    REPORT_GROUPS_MD,
)
from prefopt.observe.fits import (
    FIT_NO_INTERVAL,
    GRADIENT_NORMS,
    PLOTTED_METRICS,
    LineFit,
    MetricFit,
    Stratum,
    fit_strata,
    no_fit_text,
)
from prefopt.observe.plots import BAND_PANELS, Band, FitPanel, GroupBands, plot_bands, plot_fits
from prefopt.observe.seed_groups import (
    GATE_MEAN_KEY,
    SEED_KEY,
    TERM_GRADIENT_PREFIX,
    Group,
    find_baselines,
    group_estimates,
    group_jobs,
    is_number,
    job_seed,
    paired_differences,
    read_job,
)
from prefopt.observe.stats import Estimate, estimate, sorted_seeds
from prefopt.observe.sweep_status import report_rows

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
        f"Grouped by {', '.join(group_by)}: {len(groups)} groups, {finished} finished jobs, {failed} failed "
        f"(not counted). Each cell: mean ± half-width of the 95% Student-t confidence interval over seeds "
        f"({SEED_KEY}), n-1 degrees of freedom; {NO_INTERVAL}. Deltas are summed log-probs (nats), first to last "
        "probe evaluation.",
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
            f"Group minus its baseline per {SEED_KEY} both have; mean ± half-width of the 95% Student-t interval over "
            "the pairs. Seeds only one side has are dropped (counted).",
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


# ---- --fit KEY ---------------------------------------------------------------------------------------------------


def format_slope(fit: LineFit) -> str:
    """`slope ± half-width [low, high]` of the 95% interval; n < 3 has none, and says so."""
    if fit.half_width is None:
        return f"{fit.slope:.4g} ({FIT_NO_INTERVAL})"
    return f"{fit.slope:.4g} ± {fit.half_width:.3g} [{fit.slope_low:.4g}, {fit.slope_high:.4g}]"


def fit_row(item: MetricFit, key: str) -> list:
    if item.fit is None:
        return [item.metric, len(item.points), no_fit_text(key, [x for x, _ in item.means]), "", ""]
    r_squared = "" if item.fit.r_squared is None else f"{item.fit.r_squared:.3f}"
    return [item.metric, item.fit.n, format_slope(item.fit), f"{item.fit.intercept:.4g}", r_squared]


def fit_markdown(strata: list[Stratum], key: str) -> str:
    """The "## Fit against KEY" section: per stratum the fit table, then the mean over seeds at each value of KEY."""
    norms = ", ".join(name.removeprefix(TERM_GRADIENT_PREFIX) for name in GRADIENT_NORMS)
    lines = [
        "",
        f"## Fit against {key}",
        "",
        f"Per stratum (the other --group-by keys' values), ordinary least squares of each metric on {key}, every run "
        f"a point: slope ± half-width [low, high] of its 95% Student-t interval (n-2 degrees of freedom; "
        f"{FIT_NO_INTERVAL}), intercept and R^2; under it the mean over seeds at each value of {key}, to see whether "
        f"the trend is a line. {norms}: the per-term gradient norm (dynamics.term_grads) averaged over each run's "
        "probe steps after step 0 (step 0 is the shared initialization).",
    ]
    for stratum in strata:
        lines += ["", f"### {stratum.label}", ""]
        if stratum.fitted:
            lines += [
                markdown_row(["metric", "n", f"slope per unit of {key}", "intercept", "R^2"]),
                "|---|---|---|---|---|",
            ]
            lines += [markdown_row(fit_row(item, key)) for item in stratum.fits]
            lines.append("")
        else:
            lines += [no_fit_text(key, stratum.x_values), ""]
        if stratum.fits:
            lines += [
                markdown_row(["mean over seeds", *(f"{key}={x:g}" for x in stratum.x_values)]),
                "|" + "---|" * (len(stratum.x_values) + 1),
            ]
            for item in stratum.fits:
                means = dict(item.means)
                cells = (f"{means[x].mean:.4g} (n={means[x].n})" if x in means else "" for x in stratum.x_values)
                lines.append(markdown_row([item.metric, *cells]))
    return "\n".join(lines) + "\n"


FIT_CSV_STATS = ("n", "x_values", "slope", "slope_ci_low", "slope_ci_high", "intercept", "r_squared", "note")


def fit_csv(strata: list[Stratum], group_by: list[str], key: str) -> str:
    """report_fit.csv: a row per stratum and metric (a column per other group-by key); a metric without a line has
    the note (why) and no numbers."""
    others = [other for other in group_by if other != key]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["stratum", *others, "fit_key", "metric", *FIT_CSV_STATS], lineterminator="\n")
    writer.writeheader()
    blank = lambda value: "" if value is None else value  # noqa: E731
    for stratum in strata:
        for item in stratum.fits:
            row = {"stratum": stratum.label, **stratum.settings, "fit_key": key, "metric": item.metric}
            row |= {"n": len(item.points), "x_values": " ".join(f"{x:g}" for x, _ in item.means)}
            fit = item.fit
            if fit is None:
                row["note"] = no_fit_text(key, [x for x, _ in item.means])
            else:
                row |= {"slope": fit.slope, "intercept": fit.intercept, "r_squared": blank(fit.r_squared)}
                row |= {"slope_ci_low": blank(fit.slope_low), "slope_ci_high": blank(fit.slope_high)}
                row["note"] = "" if fit.half_width is not None else FIT_NO_INTERVAL
            writer.writerow(row)
    return buffer.getvalue()


def fit_panels(strata: list[Stratum], key: str) -> list[list[FitPanel]]:
    """report_fit.png's rows: per stratum with runs, its PLOTTED_METRICS that some run has."""
    rows = []
    for stratum in strata:
        items = {item.metric: item for item in stratum.fits}
        panels = []
        for metric in (name for name in PLOTTED_METRICS if name in items):
            item, fit = items[metric], items[metric].fit
            note = no_fit_text(key, [x for x, _ in item.means]) if fit is None else f"slope {format_slope(fit)}"
            if fit is not None and fit.r_squared is not None:
                note += f", R^2 {fit.r_squared:.2f}"
            panels.append(
                FitPanel(
                    title=f"{metric}\n{stratum.label}",
                    xlabel=key,
                    ylabel="nats (first to last probe)"
                    if metric.startswith("delta/")
                    else "mean norm, probe steps > 0",
                    points=item.points,
                    means=[(x, value.mean) for x, value in item.means],
                    slope=None if fit is None else fit.slope,
                    intercept=None if fit is None else fit.intercept,
                    note=note,
                )
            )
        if panels:
            rows.append(panels)
    return rows


@dataclass
class GroupReport:
    groups: list[Group]
    baselines: dict[str, Group]  # group label -> the group it is compared with
    markdown: str
    plot: Optional[Path]  # report_bands.png, None when no finished job recorded dynamics
    fit_plot: Optional[Path] = None  # report_fit.png with --fit, None when no stratum had a metric to draw


def build_group_report(
    sweep_dir: Path, group_by: list[str], baseline: Optional[list[str]] = None, fit: Optional[str] = None
) -> GroupReport:
    """Group the sweep's jobs by `group_by` and write report_groups.md, report_groups.csv and report_bands.png; with
    `fit` (a numeric group-by key) the fit section, report_fit.csv and report_fit.png. Refuses before writing."""
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(job_dir) for job_dir in report_rows(sweep_dir)[1]]  # a sweep's jobs or a folder's runs
    groups = group_jobs(jobs, group_by)
    baselines = find_baselines(groups, baseline, group_by)
    strata = fit_strata(groups, group_by, fit) if fit else None
    markdown = groups_markdown(sweep_dir, groups, group_by, baselines)
    fit_plot = None
    if strata is not None:
        markdown += fit_markdown(strata, fit)
        atomic_write_text(sweep_dir / REPORT_FIT_CSV, fit_csv(strata, group_by, fit))
        panels = fit_panels(strata, fit)
        fit_plot = plot_fits(panels, sweep_dir / REPORT_FIT_PLOT) if panels else None
    atomic_write_text(sweep_dir / REPORT_GROUPS_MD, markdown)
    atomic_write_text(sweep_dir / REPORT_GROUPS_CSV, groups_csv(groups, group_by, baselines))
    with_dynamics = [group for group in groups if any(job.dynamics for job in group.jobs)]
    plot = None
    if with_dynamics:
        facet_key = band_facet_key(with_dynamics, group_by)
        plot = plot_bands([group_bands(group, facet_key) for group in with_dynamics], sweep_dir / REPORT_BANDS_PLOT)
    return GroupReport(groups, baselines, markdown, plot, fit_plot)
