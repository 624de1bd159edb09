"""Statistics over seeds: mean, sample standard deviation and Student-t confidence intervals, for one
group of runs and for paired differences between two groups.

Why Student t: a sweep has a handful of seeds per setting (3 to 10), too few for the normal
approximation; the t interval is exact for normally distributed run-to-run noise and widens honestly
when n is small (n = 3: the 95% half-width is 2.48 standard deviations, not 1.13).

Why paired differences: two settings run with the same seeds share the data order and the initial
tiny-model weights, so the per-seed difference cancels much of the seed-to-seed noise; its t interval
is what says whether a method beats the baseline.

Pure Python on purpose: scipy is not a dependency, and the t quantile needs only the regularized
incomplete beta function (continued fraction) inverted by bisection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Optional, Sequence

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A sample's n, mean, sample standard deviation (n-1) and t confidence interval.

    mean is None for n = 0; std and the interval are None for n < 2 (one value has no spread)."""

    n: int
    mean: Optional[float]
    std: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]

    @property
    def half_width(self) -> Optional[float]:
        return None if self.ci_high is None else (self.ci_high - self.ci_low) / 2


@dataclass(frozen=True)
class PairedDifference:
    """Group minus baseline, seed by seed, over the seeds both have; the seeds only one side has are
    dropped (a difference needs both) and listed, so a reader sees how many pairs are left."""

    estimate: Estimate
    paired_seeds: tuple
    dropped_seeds: tuple


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> float:
    """Standard deviation with n-1 in the denominator (Bessel): the unbiased variance of a sample."""
    center = mean(values)
    return math.sqrt(math.fsum((value - center) ** 2 for value in values) / (len(values) - 1))


def estimate(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """n, mean, std and the two-sided Student-t interval mean +- t(1 - alpha/2, n-1) * std / sqrt(n)."""
    values = list(values)
    n = len(values)
    if n == 0:
        return Estimate(0, None, None, None, None)
    center = mean(values)
    if n == 1:
        return Estimate(1, center, None, None, None)
    std = sample_std(values)
    half_width = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Estimate(n, center, std, center - half_width, center + half_width)


def paired_difference(
    values_by_seed: Mapping[Hashable, float], baseline_by_seed: Mapping[Hashable, float], confidence: float = CONFIDENCE
) -> PairedDifference:
    """The estimate of values - baseline over the seeds present on both sides."""
    paired = sorted_seeds(set(values_by_seed) & set(baseline_by_seed))
    dropped = sorted_seeds(set(values_by_seed) ^ set(baseline_by_seed))
    differences = [values_by_seed[seed] - baseline_by_seed[seed] for seed in paired]
    return PairedDifference(estimate(differences, confidence), tuple(paired), tuple(dropped))


def sorted_seeds(seeds: set) -> list:
    """Seeds in numeric order when they are numbers, else by their text (a seed may be any YAML value)."""
    try:
        return sorted(seeds)
    except TypeError:
        return sorted(seeds, key=str)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom, through the regularized incomplete beta:
    P(|T| > |t|) = I_{df/(df+t^2)}(df/2, 1/2)."""
    tail = 0.5 * regularized_incomplete_beta(df / (df + t * t), df / 2, 0.5)
    return 1 - tail if t >= 0 else tail


def t_quantile(probability: float, df: float) -> float:
    """The t value with P(T <= t) = probability, found by bisection on t_cdf (monotone, so it always
    converges); t_quantile(0.975, 2) = 4.302653."""
    if not 0 < probability < 1:
        raise ValueError(f"probability must lie in (0, 1), got {probability}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if probability == 0.5:
        return 0.0
    if probability < 0.5:
        return -t_quantile(1 - probability, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < probability:  # widen until the root is bracketed (df=1, p=0.9995: t = 636.6)
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * high:
            break
    return (low + high) / 2


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), by the continued fraction of Numerical Recipes (betai), on the side where it
    converges fast (x below the mean (a+1)/(a+b+2), else by symmetry I_x(a,b) = 1 - I_{1-x}(b,a))."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    # x^a (1-x)^b / B(a, b): the same for (x, a, b) and (1-x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * beta_continued_fraction(x, a, b) / a
    return 1 - front * beta_continued_fraction(1 - x, b, a) / b


def beta_continued_fraction(x: float, a: float, b: float, max_terms: int = 500, tolerance: float = 1e-15) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging in O(sqrt(max(a, b))) terms."""
    tiny = 1e-300  # keeps a denominator that hits zero from dividing by zero
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, max_terms + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= d * c
        if abs(d * c - 1) < tolerance:
            break
    return fraction


@dataclass(frozen=True)
class Correlation:
    """A Spearman rank correlation over n pairs of values with its confidence interval (Fisher z)."""

    n: int
    rho: float
    ci_low: float
    ci_high: float


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda index: values[index])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mean_x, mean_y = mean(x), mean(y)
    covariance = math.fsum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    spread = math.sqrt(math.fsum((a - mean_x) ** 2 for a in x) * math.fsum((b - mean_y) ** 2 for b in y))
    return covariance / spread if spread > 0 else float("nan")


def fisher_interval(rho: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Fisher's z interval for a Spearman correlation, with the standard error sqrt(1.06 / (n - 3)) (Fieller,
    Hartley & Pearson 1957): tanh(atanh(rho) +- z * se). Needs n > 3."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    center = math.atanh(max(min(rho, 1 - 1e-12), -1 + 1e-12))
    half_width = z * math.sqrt(1.06 / (n - 3))
    return math.tanh(center - half_width), math.tanh(center + half_width)


def spearman(x: Sequence[float], y: Sequence[float], confidence: float = CONFIDENCE) -> Correlation:
    """Spearman's rho (the Pearson correlation of average ranks) with its Fisher-z interval; n must exceed 3."""
    if len(x) != len(y) or len(x) < 4:
        raise ValueError(f"spearman needs two equally long samples of at least 4 values (got {len(x)}, {len(y)})")
    rho = pearson(average_ranks(x), average_ranks(y))
    low, high = fisher_interval(rho, len(x), confidence)
    return Correlation(len(x), rho, low, high)


def pooled_correlation(correlations: Sequence[Correlation], confidence: float = CONFIDENCE) -> Correlation:
    """Several independent samples' correlations (one per seed) pooled in Fisher z, weighted by n - 3."""
    from statistics import NormalDist

    weights = [item.n - 3 for item in correlations]
    center = math.fsum(w * math.atanh(max(min(c.rho, 1 - 1e-12), -1 + 1e-12)) for w, c in zip(weights, correlations))
    center /= sum(weights)
    half_width = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(1.06 / sum(weights))
    total = sum(item.n for item in correlations)
    return Correlation(total, math.tanh(center), math.tanh(center - half_width), math.tanh(center + half_width))
