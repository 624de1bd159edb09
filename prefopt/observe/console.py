"""What a training run says on the console (rank 0 only): progress with an ETA, each eval's headline,
and a closing summary that says where everything went and what to run next.

Two modes (logger.console): `fancy` redraws one status line in place on stderr (a bar over the training
steps, or over an eval / probe / reference pass while one runs); `plain` never writes a carriage return
(SLURM logs, files, pipes): the step lines, written every trainer.log_every steps, carry the ETA, and a
long pass prints a progress line now and then. `auto` is fancy when stderr is a terminal.

Lines that are records (step lines, eval headlines, the summary) go through the `prefopt` logger, so
they land in the same stream and in Hydra's log file like every other message; only the fancy status
line is written to stderr directly, wiped before a log record and drawn again after it. The lines
themselves are formatted in prefopt/observe/console_lines.py.

Passes report their batches through `report_progress` (called by prefopt/train/sharding.py for every pass
over eval pairs, probes, reference pairs and greedy prompts), which reaches the console of this process
if one is active: no progress object has to be threaded through the scoring functions.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Counter, Iterable, Iterator, Mapping, Optional, TextIO

from prefopt.observe.console_lines import (
    eval_headline,
    format_duration,
    metric,
    pass_kind,
    scheduled_passes,
    step_line,
    summary_lines,
    training_eta,
)

log = logging.getLogger("prefopt")

CONSOLE_MODES = ("auto", "fancy", "plain")
SHOW_AFTER_SECONDS = 2.0  # a pass that ends sooner shows nothing (most passes of a tiny run)
TICK_SECONDS = 1.0  # how often the status line (fancy) or a long pass (plain) is looked at between batches
PLAIN_PASS_EVERY_SECONDS = 30.0  # plain mode: a long pass prints a progress line at most this often
BAR_WIDTH = 24  # characters inside [...]

_active: Optional["Console"] = None  # the console of this process while a run is training

# The passes a training run makes between and after its steps, as their phase labels begin ("eval @ step 10"): the
# ETA counts the ones still to come at the time each kind took (prefopt/train/evaluation.py labels them)
EVAL_PASS, GREEDY_PASS, PROBE_PASS = "eval", "greedy answers", "probes"
TERM_GRADS_PASS, PROBE_GENERATION_PASS = "term gradients", "probe generations"


def report_progress(done: int, total: int) -> None:
    """`done` of `total` batches of the current pass are finished (a no-op without an active console)."""
    if _active is not None:
        _active.pass_progress(done, total)


def resolve_mode(mode: str, stream: TextIO) -> str:
    """auto -> fancy on a terminal, plain otherwise (a redrawn line in a log file is a mess of \\r)."""
    if mode not in CONSOLE_MODES:
        raise ValueError(f"logger.console={mode!r}: choose one of {', '.join(CONSOLE_MODES)}")
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    return "fancy" if isatty is not None and isatty() else "plain"


def eta_seconds(done: int, total: int, started: float, last_done_at: float, now: float) -> Optional[float]:
    """Time left at the average rate of the units done so far, counting down between them; None before any."""
    if done <= 0:
        return None
    return max(0.0, (last_done_at - started) / done * max(0, total - done) - (now - last_done_at))


def progress_text(label: str, done: int, total: int, unit: str, elapsed: float, eta: Optional[float], bar: bool) -> str:
    """'eval @ step 0 [#####.....] 3/8 batches | 0:05 elapsed | ETA 0:08' (plain mode: no bar). Before the
    first unit of a pass is done its size is not known yet: 'eval @ step 0 | 0:05 elapsed'."""
    if not total:
        return f"{label}{' |' if bar else ': running,'} {format_duration(elapsed)} elapsed"
    filled = BAR_WIDTH * done // total
    drawn = f" [{'#' * filled}{'.' * (BAR_WIDTH - filled)}]" if bar else ":"
    return (
        f"{label}{drawn} {done}/{total} {unit} | {format_duration(elapsed)} elapsed | "
        f"ETA {format_duration(eta) if eta is not None else '?'}"
    )


class Console:
    """The console of one run. Disabled (enabled=False: every rank but 0) it does nothing.

    A daemon thread ticks every `tick_seconds` (None: no thread; tests call tick()), so a pass or a step
    that runs for minutes shows its elapsed time and ETA moving even between batches. Fancy mode wraps the
    emit of the logging handlers that write to the terminal: a record wipes the status line, is written,
    and the status line is drawn again below it; the two never share a line. The lock guards the state
    and the status line; nothing logs while holding it (a handler's lock is taken first on that path)."""

    def __init__(
        self,
        mode: str,
        run_dir: Path,
        wandb_mode: str,
        enabled: bool = True,
        stream: Optional[TextIO] = None,
        tick_seconds: Optional[float] = TICK_SECONDS,
    ):
        global _active
        self.stream = stream or sys.stderr
        self.mode = resolve_mode(mode, self.stream)
        self.run_dir, self.wandb_mode, self.enabled = run_dir, wandb_mode, enabled
        self.lock = threading.RLock()
        self.status_shown = False
        self.train_total = self.train_done = self.train_first = 0
        self.train_started = self.last_step_at = self.last_event_at = 0.0
        self.step_seconds = 0.0  # the steps' own time so far (passes between them excluded)
        self.train_loss: Optional[float] = None
        self.loss_step = 0  # the step train_loss is of (the last logged one)
        self.pass_seconds: Counter = collections.Counter()  # kind -> seconds of every pass of that kind so far
        self.pass_count: Counter = collections.Counter()  # kind -> passes of that kind so far
        self.train_pass_seconds = 0.0  # seconds of passes since training started
        self.passes_left: Counter = collections.Counter()  # kind -> passes still to come in training
        self.phase_label: Optional[str] = None
        self.phase_started = self.pass_started = self.last_batch_at = self.last_plain = 0.0
        self.pass_done = self.pass_total = 0
        self.phase_shown = False
        self.wrapped: list[tuple] = []  # (handler, its emit before ours, whether that was an instance attribute)
        self.stop = threading.Event()
        self.ticker: Optional[threading.Thread] = None
        if not enabled:
            return
        if _active is not None:
            _active.close()  # a run of this process that failed before its close (an error while building)
        _active = self
        if self.mode == "fancy":
            for handler in logging.getLogger().handlers + log.handlers:
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    self._wrap_emit(handler)
        if tick_seconds:
            self.ticker = threading.Thread(
                target=self._tick_loop, args=(tick_seconds,), name="prefopt-console", daemon=True
            )
            self.ticker.start()

    def _wrap_emit(self, handler: logging.Handler) -> None:
        original = handler.emit

        def emit(record: logging.LogRecord) -> None:
            with self.lock:
                self.wipe()
                original(record)
                self.refresh()

        self.wrapped.append((handler, original, "emit" in vars(handler)))
        handler.emit = emit

    def _tick_loop(self, seconds: float) -> None:
        while not self.stop.wait(seconds):
            self.tick()

    def tick(self) -> None:
        """Fancy: redraw the status line (elapsed and ETA move). Plain: a pass running past SHOW_AFTER_SECONDS
        prints a line then, and again every PLAIN_PASS_EVERY_SECONDS."""
        if self.mode == "fancy":
            with self.lock:
                self.refresh()
            return
        with self.lock:
            line = self.plain_pass_line(time.time())
        if line:
            log.info("%s", line)

    # --- what the status shows
    def phase_text(self, now: float, bar: bool) -> str:
        eta = eta_seconds(self.pass_done, self.pass_total, self.pass_started, self.last_batch_at, now)
        return progress_text(
            self.phase_label, self.pass_done, self.pass_total, "batches", now - self.pass_started, eta, bar
        )

    def training_active(self) -> bool:
        return bool(self.train_started) and self.train_done < self.train_total

    def status_text(self, now: float) -> Optional[str]:
        """The fancy status line now: the running pass once it is SHOW_AFTER_SECONDS old, else the training bar."""
        if self.phase_label is not None and now - self.phase_started >= SHOW_AFTER_SECONDS:
            self.phase_shown = True
            return self.phase_text(now, bar=True)
        if self.training_active():
            steps = self.train_done - self.train_first
            text = progress_text(
                "train", self.train_done, self.train_total, "steps", now - self.train_started, self.eta(now), bar=True
            )
            rate = f" | {self.seconds_per_step():.2f} s/step" if steps else ""
            loss = ""
            if self.train_loss is not None:  # with trainer.log_every > 1: the last logged step's, and which it is
                of_step = f" (step {self.loss_step})" if self.loss_step != self.train_done else ""
                loss = f" | loss {self.train_loss:.4f}{of_step}"
            return text + rate + loss
        return None

    def eta(self, now: float) -> Optional[float]:
        """Training time left (training_eta); None before the first step of this process."""
        steps = self.train_done - self.train_first
        if steps <= 0:
            return None
        seconds_per_pass = {kind: self.pass_seconds[kind] / self.pass_count[kind] for kind in self.pass_count}
        return training_eta(
            self.train_total - self.train_done,
            self.seconds_per_step(),
            self.passes_left,
            seconds_per_pass,
            now - self.last_event_at,
        )

    def plain_pass_line(self, now: float) -> Optional[str]:
        if (
            self.phase_label is None
            or now - self.phase_started < SHOW_AFTER_SECONDS
            or now - self.last_plain < PLAIN_PASS_EVERY_SECONDS
        ):
            return None
        self.phase_shown, self.last_plain = True, now
        return self.phase_text(now, bar=False)

    # --- the fancy status line (call with the lock held)
    def refresh(self) -> None:
        if self.mode != "fancy" or not self.enabled:
            return
        text = self.status_text(time.time())
        if text is None:
            self.wipe()
        else:
            self.draw(text)

    def draw(self, text: str) -> None:
        width = shutil.get_terminal_size((100, 24)).columns
        self.stream.write(
            "\r" + text[: max(10, width - 1)] + "\x1b[K"
        )  # never wider than the terminal: a wrapped line cannot be redrawn
        self.stream.flush()
        self.status_shown = True

    def wipe(self) -> None:
        if self.status_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.status_shown = False

    # --- training steps
    def start_training(
        self,
        first_step: int,
        max_steps: int,
        passes_every: Optional[Mapping[str, int]] = None,
        final_passes: Iterable[str] = (),
    ) -> None:
        """Called before the first step of this process (first_step: the step a resumed run starts after), with the
        passes the run makes (scheduled_passes' arguments) for the ETA."""
        with self.lock:
            self.train_first, self.train_done, self.train_total = first_step, first_step, max_steps
            self.train_started = self.last_step_at = self.last_event_at = time.time()
            self.step_seconds = self.train_pass_seconds = 0.0
            self.passes_left = scheduled_passes(first_step, max_steps, passes_every or {}, final_passes)

    def seconds_per_step(self) -> float:
        """The steps' own time (the passes between them excluded) per step, so far."""
        steps = self.train_done - self.train_first
        return self.step_seconds / steps if steps else 0.0

    def step_done(self, step: int, metrics: Optional[Mapping[str, Any]] = None) -> None:
        """After every optimizer step, with its metrics when the step logs them (every trainer.log_every): the fancy
        bar moves and shows this step's loss; a logged step writes its line, with the rate and the ETA."""
        if not self.enabled:
            return
        with self.lock:
            now = time.time()
            self.train_done, self.last_step_at, self.last_event_at = step, now, now
            self.step_seconds = now - self.train_started - self.train_pass_seconds
            line = None
            if metrics is not None:
                self.train_loss, self.loss_step = metric(metrics, "train", "loss"), step
                line = step_line(step, self.train_total, metrics, self.seconds_per_step(), self.eta(now))
            self.refresh()
        if line is not None:
            log.info("%s", line)

    # --- passes (eval, probes, reference log-probs, greedy answers)
    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        """Around a pass (or a few): shown once it has run SHOW_AFTER_SECONDS, then a line says how long it took."""
        if not self.enabled:
            yield
            return
        with self.lock:
            self.phase_label, self.phase_started, self.phase_shown = label, time.time(), False
            self.pass_started = self.last_batch_at = self.phase_started
            self.pass_done, self.pass_total, self.last_plain = 0, 0, 0.0
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            with self.lock:
                now = time.time()
                shown, seconds = self.phase_shown, now - self.phase_started
                self.phase_label = None
                if not failed:
                    self.pass_done_in(label, seconds, now)
                self.refresh()
            if shown and not failed:
                log.info("%s: done in %s", label, format_duration(seconds))

    def pass_done_in(self, label: str, seconds: float, now: float) -> None:
        """A pass took `seconds`: its kind's time per pass; during training, one fewer to come, and its time is not
        the steps' (call with the lock held)."""
        kind = pass_kind(label)
        self.pass_seconds[kind] += seconds
        self.pass_count[kind] += 1
        if self.training_active():
            self.train_pass_seconds += seconds
            self.last_event_at = now
            if self.passes_left[kind] > 0:
                self.passes_left[kind] -= 1

    def pass_progress(self, done: int, total: int) -> None:
        if not self.enabled or self.phase_label is None:
            return
        with self.lock:
            now = time.time()
            if done <= self.pass_done or total != self.pass_total:  # the next pass of this phase (its ETA is its own)
                self.pass_started = self.last_batch_at if self.pass_done else self.phase_started
                self.pass_total = total
            self.pass_done, self.last_batch_at = done, now
            self.refresh()
        if self.mode == "plain" and done < total:
            self.tick()

    # --- records
    def eval_result(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.enabled and metrics:
            log.info("%s", eval_headline(step, metrics))

    def alarm(self, text: str) -> None:
        """A warning about the run's course (the likelihood-displacement alarm), said once, between the step lines."""
        if self.enabled:
            log.warning("%s", text)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The closing summary (after summary.json, the plot and the final checkpoint are written)."""
        if self.enabled:
            log.info("%s", "\n".join(summary_lines(summary, self.run_dir, self.wandb_mode)))

    def close(self) -> None:
        """However the run ends: stop ticking, wipe the status line (an error message starts on a clean line),
        unhook."""
        global _active
        if not self.enabled:
            return
        self.stop.set()
        if self.ticker is not None and self.ticker is not threading.current_thread():
            self.ticker.join(timeout=5)
        with self.lock:
            self.wipe()
            for handler, original, had_own_emit in self.wrapped:
                if had_own_emit:
                    handler.emit = original
                else:
                    del handler.emit  # the class's emit again
            self.wrapped, self.enabled = [], False
        if _active is self:
            _active = None


class _CpuAcceleratorNotice(logging.Filter):
    """Drops DeepSpeed's 'Setting accelerator to CPU. If you have GPU or other accelerator, we were unable
    to detect it.' On hardware with device=cpu the CPU is the device asked for, so the warning is false.
    DeepSpeed is imported even by a plain-torch CPU run: transformers' save_pretrained unwraps the model
    through accelerate, which imports deepspeed whenever it is installed, and its import auto-detects."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU")


def quiet_known_noise(device: str, wandb_mode: str) -> None:
    """Silence messages that say nothing to a prefopt user (worker side, before the model is built)."""
    if wandb_mode == "offline":
        # "W&B syncing is set to `offline`...", "Run data is saved locally in ...", "View this run in the
        # terminal with `wandb leet`": the closing summary says where the offline run is and how to upload it.
        # Online runs keep W&B's own lines (the run's URL). An explicit WANDB_SILENT wins.
        os.environ.setdefault("WANDB_SILENT", "true")
    if device == "cpu":
        deepspeed_logger = logging.getLogger(
            "DeepSpeed"
        )  # the name DeepSpeed's logger factory uses; filters survive its setup
        if not any(isinstance(existing, _CpuAcceleratorNotice) for existing in deepspeed_logger.filters):
            deepspeed_logger.addFilter(_CpuAcceleratorNotice())
    # transformers' own tqdm bars ("Writing model shards" at every checkpoint) scribble \r into logs and
    # cut through the console's status line; the console reports the run's progress itself
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
