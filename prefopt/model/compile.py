"""trainer.compile: torch.compile of the model's decoder layers, forward and backward.

What is compiled is what runs element-wise kernels one by one in eager mode: each decoder layer's norms,
projections, rotary, activations and residuals (inductor fuses the element-wise ones). The layers are
compiled one by one (each layer's module.compile), not the whole model: all layers share one forward, so
one compiled graph serves every layer; the model's root forward (embeddings, mask building, ZeRO-3 hooks)
stays eager. Attention by pieces runs eagerly inside the layer (a graph break: model/attention.py registers
it disabled for dynamo), as traced, its Python loop over a batch's pieces would recompile for every batch.
The head (model/logps.py) stays eager. Shapes are dynamic, so a new batch length does not recompile.

It costs compiling on the first forwards (17.7 s for SmolLM2-135M on 2 CPU cores, plus recompiles for eval and
generation shapes) and pays only when the steps it speeds up outweigh that: on the CPU it did not (README), so it
is off by default; the run reports the compile seconds (train/compile_s). Not with DeepSpeed or gradient
checkpointing (build.py refuses them: untested).
"""

from __future__ import annotations

import torch


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a causal LM: modules whose class is a *DecoderLayer (every HF decoder names them so)."""
    return [module for module in model.modules() if type(module).__name__.endswith("DecoderLayer")]


def compile_model(model) -> int:
    """Compile the model's decoder layers in place; returns how many. Refuses a model without any."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no *DecoderLayer modules for trainer.compile to compile; "
            "set trainer.compile=false"
        )
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process so far (dynamo tracing + inductor codegen)."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    return sum(float(value) for name, value in zip(names, values) if name == "_compile.compile_inner")
