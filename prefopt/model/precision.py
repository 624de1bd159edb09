"""The precision rule: `model.dtype` is the *compute* dtype; the weights that train stay fp32.

`model.dtype=bf16` means what it means in every other trainer (mixed precision):
  - torch engine: the model is loaded in fp32 (the master weights the optimizer updates, with fp32
    gradients and fp32 AdamW state) and every forward runs under `torch.autocast(bf16)`. Pure bf16
    weights would not train: an AdamW update is about lr (3e-6) in size and bf16 keeps 8 bits of
    mantissa, so any weight above ~1e-3 in magnitude rounds back to itself.
  - DeepSpeed: its own bf16 path (`"bf16": {"enabled": true}`): bf16 module weights for compute and
    fp32 master weights + AdamW state inside its optimizer (FP16_UnfusedOptimizer at ZeRO-0, the ZeRO
    optimizer at stages 1-3; measured: one step at lr 3e-6 changes every master tensor). The module
    is loaded in fp32 and DeepSpeed casts it; exports write the fp32 master weights.
`model.dtype=fp32` is fp32 everywhere. There is no pure low-precision training mode.

The compute dtype is a property of the model object (set once by `set_compute_dtype`), so every
forward (policy, the frozen reference copy, probes, generation) picks it up without threading it
through every call.
"""

from __future__ import annotations

import contextlib

import torch

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ATTRIBUTE = "prefopt_autocast_dtype"


def set_compute_dtype(model: torch.nn.Module, dtype_name: str, engine: str) -> None:
    """Autocast for the torch engine in bf16; DeepSpeed's bf16 path casts the weights itself."""
    dtype = COMPUTE_DTYPES[dtype_name]
    setattr(model, _ATTRIBUTE, dtype if (dtype != torch.float32 and engine == "torch") else None)


def autocast_dtype(model: torch.nn.Module):
    """The dtype forwards of this model autocast to, or None (fp32, or weights already in bf16)."""
    return getattr(model, _ATTRIBUTE, None)


@contextlib.contextmanager
def full_precision(model: torch.nn.Module):
    """Forwards inside run in fp32 (no autocast): for checks whose tolerance must not absorb bf16 noise."""
    saved = getattr(model, _ATTRIBUTE, None)
    setattr(model, _ATTRIBUTE, None)
    try:
        yield
    finally:
        setattr(model, _ATTRIBUTE, saved)


def autocast(model: torch.nn.Module, device_type: str):
    """The context every forward of `model` runs in."""
    dtype = autocast_dtype(model)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)
