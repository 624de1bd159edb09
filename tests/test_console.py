"""The console of a run (prefopt/observe/console.py): progress with ETA, eval headlines, the closing summary,
plain vs fancy mode, and the noise it keeps out. One tiny `prefopt train` in a subprocess (its whole
stdout + stderr, as a user or a SLURM log sees it); the rest are unit tests with a fake clock."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from prefopt.core.errors import ConfigError
from prefopt.observe import console as console_module
from prefopt.observe.console import SHOW_AFTER_SECONDS, Console, report_progress, resolve_mode
from prefopt.observe.console_lines import (
    METRIC_NAMES,
    eval_headline,
    format_duration,
    scheduled_passes,
    summary_lines,
    training_eta,
)
from prefopt.run.config import validate_config
from tests.test_config import compose_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(run dir, stdout + stderr) of a tiny run with probes, greedy eval, W&B offline and a final checkpoint,
    stderr not a terminal (auto = plain), as under SLURM."""
    run_dir = tmp_path_factory.mktemp("console") / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt.cli",
            "train",
            "model=tiny_llama",
            "hardware=cpu",
            f"trainer.max_steps={STEPS}",
            "dynamics.num_probes=2",
            "trainer.greedy_eval_examples=2",
            "trainer.max_new_tokens=4",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return run_dir.resolve(), output


@pytest.mark.slow  # one tiny end-to-end run in a subprocess, shared by the four tests that read it
def test_plain_console_writes_no_carriage_return(tiny_run):
    _, output = tiny_run
    assert "\r" not in output
    step_lines = [line for line in output.splitlines() if f"step {STEPS}/{STEPS} |" in line]
    assert len(step_lines) == 1 and "s/step | ETA " in step_lines[0], output


@pytest.mark.slow
def test_eval_headlines_at_the_start_and_the_end(tiny_run):
    _, output = tiny_run
    for step in (0, STEPS):
        [line] = [line for line in output.splitlines() if f"eval @ step {step} |" in line]
        for label in ("acc ", "margin ", "logp chosen ", " rejected ", "loss ", "greedy acc "):
            assert label in line, line
        assert "n/a" not in line, f"a metric name in console.METRIC_NAMES is not logged any more: {line}"


@pytest.mark.slow
def test_closing_summary_names_real_paths_and_commands(tiny_run):
    run_dir, output = tiny_run
    lines = output.splitlines()
    start = next(index for index, line in enumerate(lines) if f"run finished: {STEPS} steps in " in line)
    summary = lines[start : start + 12]
    text = "\n".join(summary)
    assert f"  run dir      {run_dir}" in summary
    assert f"  plot         {run_dir / 'dynamics.png'}" in summary and (run_dir / "dynamics.png").is_file()
    [checkpoint] = [line.split()[-1] for line in summary if line.startswith("  checkpoint")]
    assert Path(checkpoint).is_dir() and Path(checkpoint).parent == run_dir / "checkpoints"
    assert f"  next         prefopt plot {run_dir}" in summary
    assert f"prefopt export {run_dir}" in text
    for column in ("dChosen", "dRejected", "dOthers", "dGreedy"):
        assert f"{column} " in text, text
    [final] = [line for line in summary if line.startswith("  final eval")]
    assert f"step {STEPS} | acc " in final and "greedy acc " in final and " -> " in final and "n/a" not in final
    [wandb_line] = [line for line in summary if line.startswith("  W&B")]
    offline_dir = wandb_line.split("wandb sync ")[-1]
    assert Path(offline_dir).is_dir() and Path(offline_dir).parent == run_dir / "wandb"


@pytest.mark.slow
def test_the_removed_noise_stays_out(tiny_run):
    _, output = tiny_run
    assert output.count("'train/pairs'") == 1, "the data stats are printed once"
    assert "data: {" not in output
    assert "Setting accelerator to CPU" not in output  # DeepSpeed's auto-detection, on hardware=cpu
    assert "Writing model shards" not in output  # transformers' tqdm bar at every checkpoint
    assert (
        "W&B syncing is set to `offline`" not in output and "wandb leet" not in output
    )  # the summary says where W&B is
    assert "Traceback" not in output and not re.search(r"\w+Warning\b", output), output  # no Python warning either


# --- unit tests


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(console_module, "time", fake)
    return fake


@pytest.fixture
def captured_log():
    """The prefopt logger's records, written the way Hydra's console handler writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("prefopt")
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(previous_level)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_auto_follows_the_terminal():
    assert resolve_mode("auto", io.StringIO()) == "plain"
    assert resolve_mode("auto", Terminal()) == "fancy"
    assert resolve_mode("plain", Terminal()) == "plain"
    with pytest.raises(ValueError, match="logger.console"):
        resolve_mode("rich", io.StringIO())


def test_logger_console_is_validated():
    validate_config(compose_config(["logger.console=plain"]))
    with pytest.raises(ConfigError, match="logger.console"):
        validate_config(compose_config(["logger.console=colour"]))


def test_durations():
    assert format_duration(7.4) == "0:07"
    assert format_duration(754) == "12:34"
    assert format_duration(3723) == "1:02:03"


def test_plain_pass_shows_after_a_few_seconds_without_carriage_returns(clock, captured_log, tmp_path):
    stream = io.StringIO()
    console = Console("plain", tmp_path, "disabled", stream=stream, tick_seconds=None)
    try:
        with console.phase("eval @ step 0"):
            clock.now += 0.5
            report_progress(1, 4)  # fast so far: nothing
            assert captured_log.getvalue() == ""
            clock.now += SHOW_AFTER_SECONDS
            report_progress(2, 4)
            clock.now += 1.0
            report_progress(3, 4)  # within PLAIN_PASS_EVERY_SECONDS of the last line: no new line
            clock.now += 1.0
            report_progress(4, 4)
        with console.phase("probes @ step 0"):
            clock.now += 0.1
            report_progress(1, 1)  # a short pass says nothing at all
    finally:
        console.close()
    lines = captured_log.getvalue().splitlines()
    assert lines == ["eval @ step 0: 2/4 batches | 0:02 elapsed | ETA 0:02", "eval @ step 0: done in 0:04"]
    assert stream.getvalue() == "" and "\r" not in captured_log.getvalue()


def test_plain_step_line_carries_the_eta(clock, captured_log, tmp_path):
    console = Console("plain", tmp_path, "disabled", stream=io.StringIO(), tick_seconds=None)
    metrics = {
        f"train/{METRIC_NAMES[name]}": value
        for name, value in {"loss": 0.69, "accuracy": 0.5, "margin": 0.01, "chosen": -40.0, "rejected": -42.0}.items()
    }
    try:
        console.start_training(0, 10)
        clock.now += 3.0
        console.step_done(1)  # not a logged step (trainer.log_every=2)
        clock.now += 3.0
        logged = {"train/learning_rate": 1e-6, "train/tokens_per_s": 100.0, "train/tflops": 0.001}
        console.step_done(2, metrics | logged)
    finally:
        console.close()
    [line] = captured_log.getvalue().splitlines()
    assert line.startswith("step 2/10 | loss 0.6900 | margin 0.010 | acc 0.50 | lr 1.00e-06")
    assert line.endswith("3.00 s/step | ETA 0:24")


def test_fancy_bar_is_redrawn_in_place_and_around_log_records(clock, captured_log, tmp_path):
    stream = Terminal()
    console = Console("auto", tmp_path, "disabled", stream=stream, tick_seconds=None)
    try:
        console.start_training(0, 4)
        clock.now += 2.0
        console.step_done(1)
        assert stream.getvalue().startswith("\rtrain [######.") and stream.getvalue().endswith("\x1b[K")
        assert "1/4 steps | 0:02 elapsed | ETA 0:06 | 2.00 s/step" in stream.getvalue()
        clock.now += 1.0
        console.tick()  # between steps the ETA counts down
        assert "ETA 0:05" in stream.getvalue().rsplit("\r", 1)[-1]
        before = len(stream.getvalue())
        logging.getLogger("prefopt").info("a record")
        assert stream.getvalue()[before:].startswith("\r\x1b[K\rtrain [")  # wiped, the record written, drawn again
        assert captured_log.getvalue() == "a record\n"
        with console.phase("greedy answers @ step 1"):
            clock.now += SHOW_AFTER_SECONDS + 3
            console.tick()  # one long batch: shown before it ends
            assert stream.getvalue().rsplit("\r", 1)[-1].startswith("greedy answers @ step 1 | 0:05 elapsed")
            report_progress(1, 1)
            assert (
                "greedy answers @ step 1 [########################] 1/1 batches"
                in stream.getvalue().rsplit("\r", 1)[-1]
            )
        assert "greedy answers @ step 1: done in 0:05" in captured_log.getvalue()
        assert stream.getvalue().rsplit("\r", 1)[-1].startswith("train [")  # the training bar is back
    finally:
        console.close()
    assert stream.getvalue().endswith("\r\x1b[K") and console_module._active is None
    assert "emit" not in vars(logging.getLogger("prefopt").handlers[-1])  # the handler is as it was


def test_plain_long_batch_shows_while_it_runs(clock, captured_log, tmp_path):
    console = Console("plain", tmp_path, "disabled", stream=io.StringIO(), tick_seconds=None)
    try:
        with console.phase("probes @ step 0"):
            clock.now += SHOW_AFTER_SECONDS
            console.tick()
            clock.now += 5
            console.tick()  # not again before PLAIN_PASS_EVERY_SECONDS
            report_progress(1, 1)
    finally:
        console.close()
    assert captured_log.getvalue().splitlines() == [
        "probes @ step 0: running, 0:02 elapsed",
        "probes @ step 0: done in 0:07",
    ]


def test_a_failed_pass_does_not_say_done(clock, captured_log, tmp_path):
    console = Console("plain", tmp_path, "disabled", stream=io.StringIO(), tick_seconds=None)
    try:
        with pytest.raises(RuntimeError), console.phase("eval @ step 0"):
            clock.now += SHOW_AFTER_SECONDS
            report_progress(1, 2)
            raise RuntimeError("out of memory")
    finally:
        console.close()
    assert "done" not in captured_log.getvalue() and "eval @ step 0: 1/2 batches" in captured_log.getvalue()


def test_the_ticker_thread_stops_on_close(tmp_path):
    console = Console("plain", tmp_path, "disabled", stream=io.StringIO(), tick_seconds=0.01)
    ticker = console.ticker
    assert ticker.is_alive()
    console.close()
    assert not ticker.is_alive()


def test_eval_headline_reads_the_metric_mapping():
    metrics = {
        f"eval/{METRIC_NAMES[name]}": value
        for name, value in {
            "loss": 0.6931,
            "accuracy": 0.75,
            "margin": 0.0123,
            "chosen": -45.2,
            "rejected": -47.1,
        }.items()
    }
    assert eval_headline(5, metrics) == (
        "eval @ step 5 | acc 0.750 | margin +0.0123 | logp chosen -45.20 rejected -47.10 | loss 0.6931"
    )
    assert "acc n/a" in eval_headline(5, {})  # a missing metric is shown as such, never a crash


def test_summary_of_a_sweep_job_points_at_the_sweep_report(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_dir = sweep_dir / "3"
    run_dir.mkdir(parents=True)
    (sweep_dir / "multirun.yaml").write_text("{}\n")
    (run_dir / "dynamics.jsonl").write_text("{}\n")
    summary = {
        "steps": 10,
        "train_seconds": 65.0,
        "delta/chosen": -1.5,
        "delta/rejected": -3.0,
        "delta/others": -0.5,
        "delta/greedy": 0.25,
    }
    lines = summary_lines(summary, run_dir, "disabled")
    assert lines[0] == "run finished: 10 steps in 1:05 (6.50 s/step incl. evals)"
    assert (
        "  squeeze      probe log-probs, first -> last probe: dChosen -1.500 | dRejected -3.000 | dOthers -0.500 | "
        "dGreedy +0.250" in lines
    )
    assert f"  next         prefopt plot {run_dir}" in lines
    assert f"               prefopt report {sweep_dir}   (once the sweep is done)" in lines
    assert any(line.startswith("  checkpoint   none written") for line in lines)
    assert not any(line.startswith("  W&B") for line in lines)


def test_scheduled_passes_count_what_train_steps_runs():
    # eval_every=10 over 30 steps: at 10 and 20 (not at 30: the final eval is there), then the final one
    assert scheduled_passes(0, 30, {"eval": 10, "probes": 7}, ["eval", "probes"]) == {"eval": 3, "probes": 5}
    assert scheduled_passes(15, 30, {"eval": 10}, ["eval"]) == {"eval": 2}  # resumed after step 15
    assert scheduled_passes(20, 30, {"eval": 10}, ["eval"]) == {"eval": 1}  # step 20's eval ran before its checkpoint
    assert scheduled_passes(0, 30, {"eval": 0}, ["eval", "greedy answers"]) == {"eval": 1, "greedy answers": 1}


def test_training_eta_adds_the_passes_to_come():
    assert training_eta(3, 2.0, {"eval": 2, "probes": 1}, {"eval": 5.0, "probes": 4.0}, since_last=1.5) == 18.5
    assert training_eta(3, 2.0, {"greedy answers": 1}, {}, since_last=0.0) == 6.0  # not measured yet: 0
    assert training_eta(0, 2.0, {}, {}, since_last=9.0) == 0.0


def test_eta_counts_evals_and_probes_at_their_measured_time(clock, captured_log, tmp_path):
    """4 steps of 1 s, an eval and probes every 2 steps and at the end: the ETA is the steps left at their own rate
    plus the passes to come at their kind's mean time, not the elapsed time per step (passes included) times the
    steps left."""
    stream = Terminal()
    console = Console("fancy", tmp_path, "disabled", stream=stream, tick_seconds=None)

    def a_pass(label: str, seconds: float) -> None:
        with console.phase(label):
            clock.now += seconds

    def step(number: int, loss: float = None) -> None:
        clock.now += 1.0
        console.step_done(number, None if loss is None else {"train/loss": loss})

    try:
        a_pass("eval @ step 0", 6.0)  # before training: measured, not counted in the steps' rate
        a_pass("probes @ step 0", 4.0)
        console.start_training(0, 4, {"eval": 2, "probes": 2}, ["eval", "probes"])
        step(1, 0.7)  # 3 steps x 1 s + 2 evals x 6 s + 2 probes x 4 s
        assert captured_log.getvalue().splitlines()[-1].endswith("1.00 s/step | ETA 0:23")
        step(2, 0.6)
        a_pass("eval @ step 2", 10.0)  # evals now take 8 s on average
        a_pass("probes @ step 2", 4.0)
        step(3, 0.5)  # 1 step x 1 s + the final eval 8 s + the final probes 4 s
        assert captured_log.getvalue().splitlines()[-1].endswith("1.00 s/step | ETA 0:13")
        assert "3/4 steps" in stream.getvalue().rsplit("\r", 1)[-1] and "ETA 0:13" in stream.getvalue()
        clock.now += 2.0
        console.tick()
        assert "ETA 0:11 | 1.00 s/step | loss 0.5000\x1b[K" in stream.getvalue().rsplit("\r", 1)[-1]
    finally:
        console.close()


def test_the_bar_shows_the_loss_of_the_step_it_counts(clock, captured_log, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the whole bar (it is cut at the terminal's width)
    stream = Terminal()
    console = Console("fancy", tmp_path, "disabled", stream=stream, tick_seconds=None)
    try:
        console.start_training(0, 4)
        clock.now += 1.0
        console.step_done(1, {"train/loss": 0.69})
        bar = stream.getvalue().rsplit("\r", 1)[-1]
        assert "1/4 steps" in bar and bar.endswith("loss 0.6900\x1b[K")
        clock.now += 1.0
        console.step_done(2)  # trainer.log_every=2: no metrics for this step, the bar says whose loss it shows
        assert (
            stream.getvalue()
            .rsplit("\r", 1)[-1]
            .endswith("2/4 steps | 0:02 elapsed | ETA 0:02 | 1.00 s/step | loss 0.6900 (step 1)\x1b[K")
        )
    finally:
        console.close()
