"""The errors a user can cause or act on: each is shown as one line (`prefopt: error: ...`) without a
traceback, so its message names the key, file, row or path and says how to fix it.

This module imports nothing from prefopt, so every layer (losses, data, checkpoints) can raise these
without importing the config schema (which is what once made config.py and losses/ import each other).
"""

from __future__ import annotations

import difflib
import signal
from typing import Iterable


class ConfigError(ValueError):
    """A config value that cannot work. The message names the key and says how to fix it."""


class DataError(ValueError):
    """Data that cannot be used. The message names the file (or hub dataset and split), the row when
    there is one, the problem and how to fix it."""


class ModelNotFoundError(RuntimeError):
    """The model cannot be found offline. The message says how to point prefopt at a local copy."""


class CheckpointError(ConfigError):
    """No usable checkpoint: the message names each one tried and what was wrong with it."""


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite values it could not skip past. The message says where and what to try."""


class HubError(RuntimeError):
    """The Hugging Face Hub cannot take an upload (offline, unreachable, not logged in, refused). The message says
    what is complete locally and how to push it later."""


# what `prefopt train` reports as one line: (error types, exit code)
USER_ERRORS = (ConfigError, DataError, ModelNotFoundError, HubError)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill PID`, `timeout`, systemd, container runtimes) outside SLURM: stops a run like Ctrl-C (the last
    whole step is checkpointed when the loop is running), and `prefopt train` exits 143 with one line."""


def stop_exception(signum: int) -> KeyboardInterrupt:
    """What a stop signal raises: Terminated for SIGTERM, KeyboardInterrupt for Ctrl-C."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def closest(word: str, choices: Iterable[str], count: int = 3) -> list[str]:
    """The choices closest to `word` by difflib's ratio: the best and those nearly as close, at most `count`."""
    close = difflib.get_close_matches(word, list(choices), n=count)
    if not close:
        return []
    best = difflib.SequenceMatcher(None, word, close[0]).ratio()
    return [match for match in close if difflib.SequenceMatcher(None, word, match).ratio() >= best - NEARLY_AS_CLOSE]


def did_you_mean(word: str, choices: Iterable[str], count: int = 3) -> str:
    """'did you mean trainer.lr?', or 'the choices: a, b, c' when none is close: the tail of a one-line error about an
    unknown key, option or topic."""
    choices = list(choices)
    close = closest(word, choices, count)
    return f"did you mean {', '.join(close)}?" if close else f"the choices: {', '.join(choices)}"


NEARLY_AS_CLOSE = 0.1  # a match this much less similar than the best is still offered
