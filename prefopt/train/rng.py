"""Every random generator a training step can draw from, saved with each checkpoint and restored on resume, so a
resumed run draws what the uninterrupted run would have."""

from __future__ import annotations

import random
from typing import Any

import numpy
import torch


def rng_states() -> dict[str, Any]:
    """Every generator a step can draw from: torch CPU, every CUDA device, numpy, Python's random."""
    kind, keys, position, has_gauss, cached_gaussian = numpy.random.get_state()
    # plain tensors and containers only, so the checkpoint loads with torch.load(weights_only=True)
    numpy_state = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(numpy.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": numpy_state,
        "python": random.getstate(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    saved = states["numpy"]
    numpy.random.set_state(
        (
            saved["kind"],
            saved["keys"].numpy().astype(numpy.uint32),
            saved["position"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    random.setstate(states["python"])
