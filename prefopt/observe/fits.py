"""`prefopt report --group-by KEYS --fit KEY`: how each headline metric moves with a numeric setting, as an ordinary
least-squares line over the runs (every seed one point), per stratum of the other group-by keys.

Why: a claim like LPO's "r2 linearly regulates the descent of the rejection probability" is a claim about a slope. A
table of group means shows a trend; the slope with its 95% interval says how large it is and whether it could be 0,
R^2 how much of the run-to-run spread the line explains, and the group means per x beside it show whether the trend
is a line at all. Every run is a point (not every group mean) so that the interval counts the seed-to-seed noise.

The slope's interval is b +- t(0.975, n-2) * se(b), se(b) = sqrt(SSE / (n-2) / Sxx), the Student t quantile of
prefopt/observe/stats.py; n < 3 leaves no degree of freedom for the noise: no interval, said. A stratum whose runs
share one value of KEY has no slope: it is listed with "one value of KEY: no fit", never dropped.
Pure Python (no numpy, no torch): `prefopt report` starts fast. prefopt/observe/group_report.py writes the files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from prefopt.core.errors import ConfigError
from prefopt.observe.seed_groups import RUN_MEAN_SUFFIX, TERM_GRADIENT_PREFIX, Group, is_number
from prefopt.observe.stats import CONFIDENCE, Estimate, estimate, t_quantile

GRADIENT_NORMS = tuple(
    f"{TERM_GRADIENT_PREFIX}{name}{RUN_MEAN_SUFFIX}" for name in ("chosen_norm", "rejected_norm", "rejected_gated_norm")
)
# what is fitted, in this order; a metric no run of a stratum has is left out of its table
FIT_METRICS = ("delta/rejected", "delta/chosen", "delta/others", "delta/greedy", *GRADIENT_NORMS)
PLOTTED_METRICS = ("delta/rejected", "delta/chosen", *GRADIENT_NORMS[:2])  # report_fit.png's columns
FIT_NO_INTERVAL = "n<3: no interval"


@dataclass(frozen=True)
class LineFit:
    """y = intercept + slope * x by ordinary least squares over n points; the slope's Student-t interval (None for
    n < 3) and R^2 (None when every y is equal: nothing to explain)."""

    n: int
    slope: float
    intercept: float
    r_squared: Optional[float]
    slope_low: Optional[float]
    slope_high: Optional[float]

    @property
    def half_width(self) -> Optional[float]:
        return None if self.slope_high is None else (self.slope_high - self.slope_low) / 2


def least_squares(x: Sequence[float], y: Sequence[float], confidence: float = CONFIDENCE) -> Optional[LineFit]:
    """The OLS line of y on x; None when x takes fewer than two values (no slope is defined)."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"least_squares needs as many x as y (got {n} and {len(y)})")
    if len(set(x)) < 2:
        return None
    mean_x, mean_y = math.fsum(x) / n, math.fsum(y) / n
    sxx = math.fsum((a - mean_x) ** 2 for a in x)
    syy = math.fsum((b - mean_y) ** 2 for b in y)
    slope = math.fsum((a - mean_x) * (b - mean_y) for a, b in zip(x, y)) / sxx
    intercept = mean_y - slope * mean_x
    residual = math.fsum((b - intercept - slope * a) ** 2 for a, b in zip(x, y))
    r_squared = None if syy == 0 else max(0.0, 1 - residual / syy)
    if n < 3:
        return LineFit(n, slope, intercept, r_squared, None, None)
    half_width = t_quantile(0.5 + confidence / 2, n - 2) * math.sqrt(residual / (n - 2) / sxx)
    return LineFit(n, slope, intercept, r_squared, slope - half_width, slope + half_width)


@dataclass
class MetricFit:
    metric: str
    points: list[tuple[float, float]]  # (x, y) per run
    means: list[tuple[float, Estimate]]  # (x, estimate over the runs at x), x ascending
    fit: Optional[LineFit]  # None: one value of the key


@dataclass
class Stratum:
    """The groups that share the values of the group-by keys other than the fitted one."""

    label: str  # those keys' values ("loss.gamma=10"), or "all runs" when KEY is the only group-by key
    settings: dict[str, str]  # key -> value text, for report_fit.csv's columns
    x_values: list[float]  # ascending
    fits: list[MetricFit]

    @property
    def fitted(self) -> bool:
        return len(self.x_values) > 1


def numeric_setting(group: Group, key: str) -> float:
    """The group's value of `key` as a number; a ConfigError naming the key and the group when it is not one."""
    setting = dict(group.settings)[key]
    try:
        value: Any = json.loads(setting.value)
    except ValueError:
        value = None
    if not is_number(value):
        raise ConfigError(
            f"--fit {key}: group {group.label} has {key}={setting.text}, not a number; fit against a numeric "
            "--group-by key (e.g. --fit loss.beta)"
        )
    return float(value)


def check_fit_key(key: str, group_by: list[str]) -> None:
    if key not in group_by:
        raise ConfigError(
            f"--fit {key}: not one of the --group-by keys ({', '.join(group_by)}); add it to --group-by "
            f"(e.g. --group-by {','.join([*group_by, key])} --fit {key})"
        )


def fit_strata(groups: list[Group], group_by: list[str], key: str) -> list[Stratum]:
    """Per stratum (the other group-by keys' values, in first-seen order) and metric of FIT_METRICS that a run of
    it has: the OLS line of the metric on `key` over the stratum's finished runs. Refuses (ConfigError) a key not in
    `group_by` or not numeric in every group before anything is fitted."""
    check_fit_key(key, group_by)
    x_of = {id(group): numeric_setting(group, key) for group in groups}
    others = [other for other in group_by if other != key]
    strata: dict[tuple, list[Group]] = {}
    for group in groups:
        strata.setdefault(tuple(dict(group.settings)[other].value for other in others), []).append(group)
    result = []
    for members in strata.values():
        settings = {other: dict(members[0].settings)[other].text for other in others}
        label = " ".join(f"{other}={text}" for other, text in settings.items()) or "all runs"
        members = sorted((group for group in members if group.jobs), key=lambda group: x_of[id(group)])
        fits = [metric_fit(members, x_of, metric) for metric in FIT_METRICS]
        x_values = sorted({x_of[id(group)] for group in members})
        result.append(Stratum(label, settings, x_values, [fit for fit in fits if fit.points]))
    return result


def metric_fit(groups: list[Group], x_of: dict[int, float], metric: str) -> MetricFit:
    points = [(x_of[id(group)], job.metrics[metric]) for group in groups for job in group.jobs if metric in job.metrics]
    means = [(x, estimate([y for at, y in points if at == x])) for x in sorted({x for x, _ in points})]
    fit = least_squares([x for x, _ in points], [y for _, y in points]) if points else None
    return MetricFit(metric, points, means, fit)


def no_fit_text(key: str, x_values: Sequence[float]) -> str:
    """Why a stratum (or a metric in it) has no line: its runs have one value of the key, or none finished."""
    if not x_values:
        return "no finished run: no fit"
    return f"one value of {key} ({', '.join(f'{x:g}' for x in x_values)}): no fit"
