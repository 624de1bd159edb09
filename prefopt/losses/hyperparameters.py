"""Typed hyperparameters for the losses and the gate.

Each loss declares its hyperparameters as a frozen dataclass whose fields carry their bounds, so one
parser turns a config node (or keyword arguments) into typed values and rejects impossible ones with
a message that names the key. The trainer and `validate_loss_config` go through the same parser.
"""

import dataclasses
import math
import typing
from typing import Any, Mapping, Optional, Sequence

from prefopt.core.errors import ConfigError


def hyperparameter(
    default: Any,
    *,
    gt: Optional[float] = None,
    ge: Optional[float] = None,
    lt: Optional[float] = None,
    le: Optional[float] = None,
    choices: Optional[Sequence[str]] = None,
) -> Any:
    """A dataclass field with the bounds (or choices) its value must respect."""
    bounds = {"gt": gt, "ge": ge, "lt": lt, "le": le}
    return dataclasses.field(
        default=default,
        metadata={"bounds": {k: v for k, v in bounds.items() if v is not None}, "choices": choices},
    )


_RELATIONS = {
    "gt": (">", lambda value, bound: value > bound),
    "ge": (">=", lambda value, bound: value >= bound),
    "lt": ("<", lambda value, bound: value < bound),
    "le": ("<=", lambda value, bound: value <= bound),
}


def show(value: Any) -> str:
    """A value as a user would type it on the command line (-1, not -1.0; strings quoted)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """Base of every loss's (and the gate's) typed hyperparameters."""

    @classmethod
    def from_config(cls, values: Mapping[str, Any], *, key_prefix: str, owner: str) -> "Hyperparameters":
        """Parse `values` into `cls`, naming the offending key on error.

        key_prefix is how the keys are spelled in the config ("loss." or "loss.gate."); owner names
        what the keys belong to in messages ("loss 'dpo'", "the gate").
        """
        names = [field.name for field in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                listed = ", ".join(names) if names else "(none)"
                raise ConfigError(
                    f"{key_prefix}{key} is not a hyperparameter of {owner}; its hyperparameters are: {listed}"
                )
        types = typing.get_type_hints(cls)
        parsed = {key: _coerce(f"{key_prefix}{key}", value, types[key]) for key, value in values.items()}
        params = cls(**parsed)
        params.validate(key_prefix)
        return params

    def validate(self, key_prefix: str = "loss.") -> None:
        """Raise ConfigError for a value outside its field's bounds or choices."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            key = f"{key_prefix}{field.name}"
            choices = field.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"{key}={show(value)} is not a valid choice; use one of: {', '.join(choices)}")
            bounds = field.metadata.get("bounds", {})
            if any(not _RELATIONS[kind][1](value, bound) for kind, bound in bounds.items()):
                required = " and ".join(f"{_RELATIONS[kind][0]} {show(bound)}" for kind, bound in bounds.items())
                raise ConfigError(f"{key}={show(value)} is impossible: it must be {required}")
        self.check_combination(key_prefix)

    def check_combination(self, key_prefix: str) -> None:
        """Constraints between fields; override where a loss has some."""


def _coerce(key: str, value: Any, expected: type) -> Any:
    """Check one value's type; ints are accepted where a float is expected."""
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={show(value)} must be true or false")
        return value
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={show(value)} must be a string")
        return value
    if expected in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={show(value)} must be a number")
        if expected is int:
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{key}={show(value)} must be a whole number")
            return int(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}={show(value)} must be a finite number")
        return float(value)
    raise TypeError(f"hyperparameter {key} has unsupported type {expected!r}")
