"""The likelihood-displacement alarm: one line, once per run, when the chosen responses' log-probs fall while the
margin rises, so "why do my chosen log-probs go down?" is answered while it happens, not found later in a chart.

Fed the metrics of each logged train step (the recipe calls update()), it fits least-squares lines over the last
`window` logged steps to the chosen series and to train/rewards/margins and fires when

- the chosen series falls and the margin rises, each slope significant in a one-sided t-test at level TREND_P:
  a trend, not batch-to-batch scatter. The t-statistic (slope over its standard error) is scale-free, so one level
  serves every model, loss and batch size, and the threshold follows the window (10 logged steps: t >= 4.0; 5:
  t >= 8.1). Simulated with independent Gaussian noise on both series and the share guard passed, 500 logged steps
  rang in 1 of 1000 runs at window 10 (5 in 1000 at window 5);
- and, when the run has a reference, most pairs of the latest step (train/chosen_displaced > 0.5) are below the
  reference: the fall is the batch's, not a few pairs' moving the mean.

A held-out eval after step 0 (the recipe calls held_out()) can fire it too, without a trend: its pairs are the same
at every eval, so there is no batch scatter to rule out. It fires when most held-out pairs' chosen log-probs are
below the reference's (eval/chosen_displaced > 0.5), their mean fell (eval/logratios/chosen < 0) and the margin rose
(eval/rewards/margins > 0: it is 0 at step 0, where the policy is the reference). The main job shows why both are
needed: its 4-pair train batches scatter too much for a significant trend in 30 steps, while its final eval has the
chosen response below the reference on all 16 held-out pairs with the margin up.

The chosen series is train/logratios/chosen when logged (the same pairs' log-probs against the reference: free of
which pairs a batch drew, whose scatter in logps/chosen can be larger than a whole run's fall), else (reference-free
losses) train/logps/chosen. Pure Python: no torch, so the recipe, tests and readers of metrics.jsonl share it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable, Mapping, Optional

from prefopt.observe.stats import t_quantile

MIN_WINDOW = 5  # fewer logged steps leave too few degrees of freedom for a slope's standard error
TREND_P = 0.002  # one-sided level of each slope's t-test (a fixed t would be lax for short windows, strict for long)
MAJORITY = 0.5  # train/chosen_displaced above this: most pairs are below the reference
CHOSEN_KEYS = ("train/logratios/chosen", "train/logps/chosen")  # the first one logged is the chosen series
MARGIN_KEY = "train/rewards/margins"
SHARE_KEY = "train/chosen_displaced"
EVAL_KEYS = ("chosen_displaced", "logratios/chosen", "rewards/margins")  # under eval/: share, chosen fall, margin
GATED_KEY = "train/gate/mean"
ALARM_METRIC = "train/displacement_alarm"  # 1.0 in the row of the step the alarm fired at
SUMMARY_STEP = "train/displacement_alarm_step"  # summary.json / W&B summary: where it fired
SUMMARY_TEXT = "train/displacement_alarm_text"  # and what it said


def trend(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(slope, t) of the least-squares line through (xs, ys): t = slope / its standard error, +-inf for points
    exactly on a sloped line, 0 for a flat one."""
    count = len(xs)
    x_mean, y_mean = sum(xs) / count, sum(ys) / count
    spread = sum((x - x_mean) ** 2 for x in xs)
    if spread == 0:
        return 0.0, 0.0
    slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys)) / spread
    residuals = sum((y - y_mean - slope * (x - x_mean)) ** 2 for x, y in zip(xs, ys))
    standard_error = math.sqrt(residuals / (count - 2) / spread) if count > 2 else math.inf
    if standard_error == 0:
        return slope, math.copysign(math.inf, slope) if slope else 0.0
    return slope, slope / standard_error


def number(metrics: Mapping[str, Any], key: str) -> Optional[float]:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class DisplacementAlarm:
    """window: logged train steps per fit (logger.displacement_window); 0 turns the alarm off."""

    def __init__(self, window: int):
        if 0 < window < MIN_WINDOW:
            raise ValueError(f"a window of {window} logged steps: use 0 (off) or >= {MIN_WINDOW}")
        self.window = window
        self.threshold = t_quantile(1 - TREND_P, window - 2) if window else math.inf  # the t a trend must reach
        self.points: deque[tuple[int, float, float]] = deque(maxlen=max(window, 1))  # (step, chosen, margin)
        self.chosen_key: Optional[str] = None
        self.fired_step: Optional[int] = None
        self.text: Optional[str] = None

    def update(self, step: int, metrics: Mapping[str, Any]) -> Optional[str]:
        """The alarm's line if it fires at this logged step (once per run), else None."""
        if not self.window or self.fired_step is not None:
            return None
        if self.chosen_key is None:
            self.chosen_key = next((key for key in CHOSEN_KEYS if key in metrics), None)
        chosen = number(metrics, self.chosen_key) if self.chosen_key else None
        margin = number(metrics, MARGIN_KEY)
        if chosen is None or margin is None:
            return None  # a skipped (non-finite) step leaves the window as it was
        self.points.append((step, chosen, margin))
        if len(self.points) < self.window:
            return None
        steps = [float(point[0]) for point in self.points]
        chosen_slope, chosen_t = trend(steps, [point[1] for point in self.points])
        margin_slope, margin_t = trend(steps, [point[2] for point in self.points])
        share = number(metrics, SHARE_KEY)
        if chosen_t > -self.threshold or margin_t < self.threshold or (share is not None and share <= MAJORITY):
            return None
        span = steps[-1] - steps[0]
        self.fired_step = step
        self.text = self.describe(chosen_slope * span, margin_slope * span, share, metrics)
        return self.text

    def held_out(self, step: int, metrics: Mapping[str, Any]) -> Optional[str]:
        """The alarm's line if a held-out eval after step 0 shows displacement (once per run), else None."""
        if not self.window or self.fired_step is not None or step <= 0:
            return None
        share, chosen, margin = (number(metrics, f"eval/{key}") for key in EVAL_KEYS)
        if share is None or chosen is None or margin is None:
            return None  # a reference-free loss: no reference to fall below
        if share <= MAJORITY or chosen >= 0 or margin <= 0:
            return None
        self.fired_step = step
        remedy = (
            "a gate that shuts sooner (raise loss.gate.tau) or loss=lpo"
            if "eval/gate/mean" in metrics
            else ("loss=gate_dpo")
        )
        self.text = (
            f"likelihood displacement: at step {step} the chosen log-probs of {100 * share:.0f}% of the held-out pairs "
            f"are below the reference (mean {chosen:.3g} nats) while the margin rose to {margin:.3g}: see `prefopt "
            f"inspect` (which pairs) and {remedy}"
        )
        return self.text

    def describe(self, chosen_change: float, margin_change: float, share: Optional[float], metrics) -> str:
        first, last = self.points[0][0], self.points[-1][0]
        against = " (against the reference)" if self.chosen_key == CHOSEN_KEYS[0] else ""
        below = f" ({100 * share:.0f}% of pairs below the reference)" if share is not None else ""
        gated = GATED_KEY in metrics
        remedy = "a gate that shuts sooner (raise loss.gate.tau) or loss=lpo" if gated else "loss=gate_dpo"
        return (
            f"likelihood displacement: chosen log-probs{against} fell {-chosen_change:.3g} nats over steps "
            f"{first}-{last} ({len(self.points)} logged steps) while the margin rose {margin_change:.3g}{below}: "
            f"see `prefopt inspect` (which pairs) and {remedy}"
        )

    def replay(self, rows: Iterable[Mapping[str, Any]], up_to_step: int) -> None:
        """A resumed run: the train rows of metrics.jsonl up to its checkpoint, fed again in order (silently), so
        the window continues and an alarm that fired before the stop is not said again (but is summarized)."""
        for row in rows:
            step = row.get("step")
            if isinstance(step, int) and step <= up_to_step and MARGIN_KEY in row:
                self.update(step, row)
            elif isinstance(step, int) and step <= up_to_step and f"eval/{EVAL_KEYS[0]}" in row:
                self.held_out(step, row)

    def summary(self) -> dict[str, Any]:
        """The closing summary's keys: the step it fired at and its line (nothing when it never fired)."""
        if self.fired_step is None:
            return {}
        return {SUMMARY_STEP: self.fired_step, SUMMARY_TEXT: self.text}
