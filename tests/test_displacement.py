"""Likelihood displacement: the share of pairs whose chosen log-prob fell below the reference's (train/metrics.py,
exact over micro batches and ranks) and the alarm that says so once per run (observe/displacement.py), on synthetic
series, on constructed batches and in a tiny DPO run that really displaces its chosen responses."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from prefopt.core.distributed import DistInfo, free_port
from prefopt.core.errors import ConfigError
from prefopt.core.runfiles import METRICS_FILE, SUMMARY_FILE
from prefopt.losses import preference_loss
from prefopt.model.logps import TokenLogps
from prefopt.observe.console_lines import summary_lines
from prefopt.observe.displacement import (
    ALARM_METRIC,
    SUMMARY_STEP,
    SUMMARY_TEXT,
    TREND_P,
    DisplacementAlarm,
    trend,
)
from prefopt.observe.stats import t_quantile
from prefopt.observe.tracking import read_jsonl
from prefopt.run.config import validate_config
from prefopt.train.metrics import DISPLACEMENT_TOLERANCE, mean_metrics, pair_metrics
from tests.helpers import read_wandb_run, run_train
from tests.test_config import compose_config
from tests.test_metrics import wandb_record_types

WINDOW = 10


def series_metrics(chosen: float, margin: float, share=0.9, chosen_key="train/logratios/chosen") -> dict:
    metrics = {chosen_key: chosen, "train/rewards/margins": margin}
    if share is not None:
        metrics["train/chosen_displaced"] = share
    return metrics


def first_alarm(chosen_slope: float, margin_slope: float, noise: float, seed: int = 0, steps: int = 60, **kwargs):
    """(step, text) of the first alarm over `steps` logged steps of linear trends plus Gaussian noise, or None."""
    rng = random.Random(seed)
    alarm = DisplacementAlarm(WINDOW)
    for step in range(1, steps + 1):
        metrics = series_metrics(
            -30 + chosen_slope * step + rng.gauss(0, noise), 0.1 + margin_slope * step + rng.gauss(0, noise), **kwargs
        )
        text = alarm.update(step, metrics)
        if text:
            return step, text
    return None


# --- the detector on synthetic series


def test_trend_equals_an_independent_least_squares_fit():
    rng = random.Random(1)
    xs = [float(step) for step in range(3, 33, 3)]
    ys = [2.0 - 0.4 * x + rng.gauss(0, 1.5) for x in xs]
    slope, t = trend(xs, ys)
    design = numpy.column_stack([numpy.ones(len(xs)), xs])
    coefficients, residuals, *_ = numpy.linalg.lstsq(design, numpy.array(ys), rcond=None)
    covariance = residuals[0] / (len(xs) - 2) * numpy.linalg.inv(design.T @ design)
    assert slope == pytest.approx(coefficients[1], rel=1e-9)
    assert t == pytest.approx(coefficients[1] / math.sqrt(covariance[1, 1]), rel=1e-9)
    assert trend(xs, [5.0] * len(xs)) == (0.0, 0.0)
    assert trend(xs, [2 * x for x in xs]) == (pytest.approx(2.0), math.inf)  # exactly on a line


def test_fires_when_chosen_falls_while_the_margin_rises():
    step, text = first_alarm(chosen_slope=-2.0, margin_slope=0.05, noise=0.5)
    assert step >= WINDOW  # never before the window is full
    assert text.startswith("likelihood displacement: chosen log-probs (against the reference) fell ")
    assert "while the margin rose" in text and "(90% of pairs below the reference)" in text
    assert "`prefopt inspect`" in text and "loss=gate_dpo" in text


def test_the_line_reports_the_fitted_fall_and_rise_over_the_window():
    alarm = DisplacementAlarm(WINDOW)
    texts = [alarm.update(step, series_metrics(-3.0 * step, 0.5 * step)) for step in range(2, 2 * WINDOW + 2, 2)]
    assert texts[:-1] == [None] * (WINDOW - 1)
    span = 2 * (WINDOW - 1)  # steps 2..20
    assert f"fell {3.0 * span:.3g} nats over steps 2-{2 * WINDOW} ({WINDOW} logged steps)" in texts[-1]
    assert f"margin rose {0.5 * span:.3g}" in texts[-1]


@pytest.mark.parametrize(
    "chosen_slope,margin_slope",
    [(1.0, 0.05), (-1.0, -0.05), (1.0, -0.05), (0.0, 0.05)],
    ids=["both rise", "both fall", "chosen rises, margin falls", "chosen flat"],
)
def test_does_not_fire_unless_chosen_falls_and_the_margin_rises(chosen_slope, margin_slope):
    assert first_alarm(chosen_slope, margin_slope, noise=0.5) is None


def test_does_not_fire_on_pure_noise():
    """Noise of any size (the test is scale-free) on both series, the share guard passed on every step: 100 runs
    of 300 logged steps stay silent (the level per window is TREND_P squared)."""
    fired = [first_alarm(0.0, 0.0, noise=size, seed=seed, steps=300) for seed in range(50) for size in (0.01, 30.0)]
    assert fired == [None] * 100


def test_a_trend_within_the_noise_does_not_fire_but_one_above_it_does():
    # chosen falls 0.05 a step under noise 1: over 10 steps 0.5, half the noise (t about 1.6 < 4.0)
    assert first_alarm(-0.05, 0.05, noise=1.0, steps=40) is None
    assert first_alarm(-0.5, 0.5, noise=1.0, steps=40) is not None


def test_most_pairs_must_be_below_the_reference():
    assert first_alarm(-2.0, 0.05, noise=0.5, share=0.5) is None
    assert first_alarm(-2.0, 0.05, noise=0.5, share=0.51) is not None


def test_reference_free_losses_use_logps_chosen_without_a_share():
    step, text = first_alarm(-2.0, 0.05, noise=0.5, share=None, chosen_key="train/logps/chosen")
    assert text.startswith("likelihood displacement: chosen log-probs fell ") and "below the reference" not in text


def test_a_gated_run_is_pointed_at_its_gate_not_at_gate_dpo():
    alarm = DisplacementAlarm(5)
    texts = [alarm.update(step, series_metrics(-step, step) | {"train/gate/mean": 0.4}) for step in range(1, 6)]
    assert "raise loss.gate.tau" in texts[-1] and "loss=gate_dpo" not in texts[-1]


def test_fires_once_per_run():
    alarm = DisplacementAlarm(WINDOW)
    texts = [alarm.update(step, series_metrics(-2.0 * step, 0.1 * step)) for step in range(1, 50)]
    fired = [step for step, text in zip(range(1, 50), texts) if text]
    assert fired == [WINDOW]
    assert alarm.summary() == {SUMMARY_STEP: WINDOW, SUMMARY_TEXT: texts[WINDOW - 1]}


def eval_metrics(share: float, chosen: float, margin: float) -> dict:
    return {"eval/chosen_displaced": share, "eval/logratios/chosen": chosen, "eval/rewards/margins": margin}


def test_a_held_out_eval_rings_when_most_chosen_fell_below_the_reference_while_the_margin_rose():
    # the main job's final eval: all 16 held-out chosen responses below the reference, margin up (no train trend)
    alarm = DisplacementAlarm(WINDOW)
    assert alarm.held_out(0, eval_metrics(1.0, -3.0, 0.4)) is None  # step 0: the policy is the reference
    for share, chosen, margin in ((0.5, -3.0, 0.4), (1.0, 0.2, 0.4), (1.0, -3.0, -0.1), (0.9, -3.0, 0.0)):
        assert alarm.held_out(30, eval_metrics(share, chosen, margin)) is None, (share, chosen, margin)
    assert alarm.held_out(30, {"eval/rewards/margins": 0.4}) is None  # reference-free: no share, no log-ratio
    text = alarm.held_out(30, eval_metrics(1.0, -3.03, 0.39))
    assert "100% of the held-out pairs" in text and "-3.03" in text and "loss=gate_dpo" in text
    assert alarm.held_out(40, eval_metrics(1.0, -5.0, 0.9)) is None  # once per run
    assert alarm.update(50, series_metrics(-100.0, 100.0)) is None
    assert alarm.summary() == {SUMMARY_STEP: 30, SUMMARY_TEXT: text}
    resumed = DisplacementAlarm(WINDOW)
    resumed.replay([{"step": 30, **eval_metrics(1.0, -3.03, 0.39)}], up_to_step=30)
    assert resumed.summary() == alarm.summary()
    assert DisplacementAlarm(0).held_out(30, eval_metrics(1.0, -3.0, 0.4)) is None  # off


def test_window_zero_is_off_and_short_windows_are_refused():
    alarm = DisplacementAlarm(0)
    assert all(alarm.update(step, series_metrics(-2.0 * step, 0.1 * step)) is None for step in range(1, 50))
    assert alarm.summary() == {}
    with pytest.raises(ValueError, match="use 0"):
        DisplacementAlarm(4)
    assert DisplacementAlarm(WINDOW).threshold == pytest.approx(t_quantile(1 - TREND_P, WINDOW - 2))
    with pytest.raises(ConfigError, match=r"logger\.displacement_window=3 .*use 0 \(off\) or >= 5"):
        validate_config(compose_config(["logger.displacement_window=3"]))
    with pytest.raises(ConfigError, match=r"logger\.displacement_window"):
        validate_config(compose_config(["logger.displacement_window=-1"]))
    validate_config(compose_config(["logger.displacement_window=0"]))


def test_a_resumed_run_goes_on_with_its_window_and_does_not_repeat_the_alarm():
    rows = [{"step": step, **series_metrics(-2.0 * step, 0.1 * step)} for step in range(1, 30)]
    eval_rows = [{"step": step, "eval/rewards/margins": 9.0, "eval/logps/chosen": 0.0} for step in (0, 5)]
    straight = DisplacementAlarm(WINDOW)
    fired = [row["step"] for row in rows if straight.update(row["step"], row)]
    assert fired == [WINDOW]
    before = DisplacementAlarm(WINDOW)  # stopped at step 6 (window not full yet), resumed
    before.replay(eval_rows + rows, up_to_step=6)  # rows past the checkpoint (and eval rows) are not fed
    assert [row["step"] for row in rows[6:] if before.update(row["step"], row)] == [WINDOW]
    assert before.summary() == straight.summary()
    after = DisplacementAlarm(WINDOW)  # stopped at step 20, after the alarm: not said again, still summarized
    after.replay(rows, up_to_step=20)
    assert not any(after.update(row["step"], row) for row in rows[20:])
    assert after.summary() == straight.summary()


def test_the_closing_summary_says_the_alarm(tmp_path):
    text = "likelihood displacement: chosen log-probs fell 12 nats ..."
    lines = summary_lines({"steps": 4, SUMMARY_STEP: 3, SUMMARY_TEXT: text}, tmp_path, "disabled")
    assert f"  alarm        step 3: {text}" in lines
    assert not any("alarm" in line for line in summary_lines({"steps": 4}, tmp_path, "disabled"))


# --- the share, from the log-probs


def constructed_policy(generator: torch.Generator, pairs: int) -> TokenLogps:
    """Token log-probs of `pairs` pairs (chosen rows first) with responses of 2 to 6 tokens."""
    lengths = torch.randint(2, 7, (2 * pairs,), generator=generator)
    mask = (torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)).float()
    logps = -torch.rand(2 * pairs, 6, generator=generator) * 3 * mask
    return TokenLogps(logps=logps, mask=mask, mean_logits=torch.zeros(2 * pairs, 6))


def constructed_reference(policy: TokenLogps, generator: torch.Generator) -> torch.Tensor:
    """Reference chosen log-probs around the policy's: clearly above or below it, tied, and (last) above it by less
    than the tolerance."""
    chosen = policy.summed[: policy.summed.shape[0] // 2]
    offsets = (torch.rand(chosen.shape, generator=generator) - 0.5) * 4
    offsets[0] = 0.0
    offsets[-1] = 0.5 * DISPLACEMENT_TOLERANCE
    return chosen + offsets


def displaced_by_hand(policy: TokenLogps, reference_chosen: torch.Tensor) -> list[bool]:
    """Pair i is displaced when sum_t log pi(chosen_t) < the reference's sum by more than the tolerance per token."""
    half = policy.logps.shape[0] // 2
    displaced = []
    for index in range(half):
        tokens = int(policy.mask[index].sum())
        policy_sum = float(policy.logps[index, :tokens].sum())
        displaced.append(policy_sum < float(reference_chosen[index]) - DISPLACEMENT_TOLERANCE * tokens)
    return displaced


def rank_micro_batches(rank: int) -> list[tuple[TokenLogps, torch.Tensor]]:
    """Rank `rank`'s two micro batches (grad_accum 2) of 3 and 1 pairs: the pooled share weighs each pair once,
    a mean of the micro batches' shares would not."""
    generator = torch.Generator().manual_seed(100 + rank)
    batches = []
    for pairs in (3, 1):
        policy = constructed_policy(generator, pairs)
        batches.append((policy, constructed_reference(policy, generator)))
    return batches


def micro_batch_parts(rank: int) -> list[dict[str, torch.Tensor]]:
    parts = []
    for policy, reference in rank_micro_batches(rank):
        chosen_rewards = torch.zeros(reference.shape)
        parts.append(pair_metrics(policy, chosen_rewards, chosen_rewards, reference))
    return parts


def test_the_column_equals_the_log_probs_and_dpos_negative_chosen_rewards():
    generator = torch.Generator().manual_seed(7)
    policy = constructed_policy(generator, 8)
    reference = constructed_reference(policy, generator)
    half = 8
    rejected_reference = policy.summed[half:] + 1.0
    out = preference_loss(
        "dpo",
        policy_chosen_logps=policy.summed[:half],
        policy_rejected_logps=policy.summed[half:],
        reference_chosen_logps=reference,
        reference_rejected_logps=rejected_reference,
        chosen_lengths=policy.lengths[:half],
        rejected_lengths=policy.lengths[half:],
        beta=0.1,
    )
    columns = pair_metrics(policy, out.chosen_rewards, out.rejected_rewards, reference)
    assert columns["chosen_displaced"].tolist() == [float(flag) for flag in displaced_by_hand(policy, reference)]
    assert columns["logratios/chosen"].tolist() == pytest.approx((policy.summed[:half] - reference).tolist())
    # away from the tolerance (all but the tie and the last pair), displaced means DPO's chosen reward < 0
    outside = slice(1, half - 1)
    assert columns["chosen_displaced"][outside].tolist() == (out.chosen_rewards[outside] < 0).float().tolist()
    assert columns["chosen_displaced"][0] == 0.0 and columns["chosen_displaced"][-1] == 0.0  # a tie is not a fall
    assert "chosen_displaced" not in pair_metrics(policy, out.chosen_rewards, out.rejected_rewards)  # no reference


def _two_rank_share(rank: int, port: int, results) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        info = DistInfo(rank=rank, local_rank=rank, world_size=2, initialized=True)
        results[rank] = mean_metrics(micro_batch_parts(rank), "train", info)
    finally:
        torch_dist.destroy_process_group()


def test_the_share_is_exact_over_micro_batches_and_ranks():
    """grad_accum 2 (micro batches of 3 and 1 pairs) on each of 2 gloo ranks: train/chosen_displaced is the share
    of the step's 8 pairs, counted by hand from the log-probs."""
    results = mp.Manager().dict()
    mp.spawn(_two_rank_share, args=(free_port(), results), nprocs=2, join=True)
    batches = [batch for rank in (0, 1) for batch in rank_micro_batches(rank)]
    flags = [flag for policy, reference in batches for flag in displaced_by_hand(policy, reference)]
    assert len(flags) == 8 and 0 < sum(flags) < 8
    for rank in (0, 1):
        assert results[rank]["train/chosen_displaced"] == pytest.approx(sum(flags) / 8, abs=1e-7)
    one_rank = mean_metrics(micro_batch_parts(0), "train", DistInfo())
    assert one_rank["train/chosen_displaced"] == pytest.approx(sum(flags[:4]) / 4, abs=1e-7)


# --- tiny runs

TINY = [
    "model=tiny_llama",
    "trainer.micro_batch_size=4",
    "trainer.eval_batch_size=4",
    "dataset.arith.num_train=16",
    "dataset.arith.num_eval=8",
    "trainer.greedy_eval_examples=0",
    "dynamics.enabled=false",
    "trainer.save_final=false",
    "logger.console=plain",
]
# DPO at a learning rate that wrecks the tiny model within steps: the margin still rises while every pair's chosen
# log-prob falls far below the reference's (about 140 nats between steps 9 and 18)
DISPLACING = [*TINY, "trainer.lr=3e-2", "trainer.lr_schedule=constant_with_warmup", "trainer.warmup_steps=2"]


def alarm_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_jsonl(run_dir / METRICS_FILE) if ALARM_METRIC in row]


def test_a_displacing_dpo_run_logs_the_share_and_rings_once(tmp_path, capfd):
    run_dir = run_train(tmp_path / "run", *DISPLACING, "trainer.max_steps=20", "trainer.eval_every=10")
    output = "".join(capfd.readouterr())
    rows = read_jsonl(run_dir / METRICS_FILE)
    for prefix in ("train", "eval"):
        shares = [row[f"{prefix}/chosen_displaced"] for row in rows if f"{prefix}/loss" in row]
        assert shares and all(0.0 <= share <= 1.0 for share in shares), prefix
    evals = [row for row in rows if "eval/loss" in row]
    assert [row["step"] for row in evals] == [0, 10, 20]
    assert evals[0]["eval/chosen_displaced"] == 0.0  # the base model is the reference: nothing has moved
    assert evals[-1]["eval/chosen_displaced"] > 0.5
    [fired] = alarm_rows(run_dir)
    assert fired[ALARM_METRIC] == 1.0 and fired["train/chosen_displaced"] > 0.5
    assert output.count("likelihood displacement:") == 2  # the warning at its step, and the closing summary's line
    assert f"  alarm        step {fired['step']}: likelihood displacement: chosen log-probs (against" in output
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary[SUMMARY_STEP] == fired["step"] and summary[SUMMARY_TEXT].startswith("likelihood displacement:")
    wandb_summary, history = read_wandb_run(run_dir)
    assert wandb_summary["summary"][SUMMARY_TEXT] == summary[SUMMARY_TEXT]
    assert [item["step"] for item in history if ALARM_METRIC in item] == [fired["step"]]
    assert "alert" in wandb_record_types(run_dir)  # the W&B alert, kept in the offline run file


@pytest.mark.slow  # two runs
def test_a_run_resumed_after_its_alarm_does_not_ring_again(tmp_path, capfd):
    args = [*DISPLACING, "trainer.max_steps=24", "trainer.save_every=20", "logger.wandb.mode=disabled"]
    run_dir = run_train(tmp_path / "run", *args, "trainer.stop_after=20")
    [fired] = alarm_rows(run_dir)
    capfd.readouterr()
    run_train(run_dir, *args, "trainer.resume=true")
    output = "".join(capfd.readouterr())
    assert output.count("likelihood displacement:") == 1  # only the closing summary's line
    assert alarm_rows(run_dir) == [fired]
    assert json.loads((run_dir / SUMMARY_FILE).read_text())[SUMMARY_STEP] == fired["step"]


def test_a_reference_free_loss_logs_no_share(tmp_path):
    run_dir = run_train(tmp_path / "run", *TINY, "loss=simpo", "trainer.max_steps=2", "logger.wandb.mode=disabled")
    rows = read_jsonl(run_dir / METRICS_FILE)
    assert any("train/loss" in row for row in rows) and any("eval/loss" in row for row in rows)
    assert not any(key.endswith(("chosen_displaced", "logratios/chosen")) for row in rows for key in row)
