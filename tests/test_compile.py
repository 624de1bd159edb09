"""trainer.compile: the compiled decoder layers give the eager run's numbers, and the run reports its compile time."""

from __future__ import annotations

import pytest
import torch

from prefopt.model.compile import compile_model, decoder_layers
from prefopt.observe.tracking import read_jsonl
from tests.helpers import run_train
from tests.test_attention import windowed_model
from tests.test_packing import TINY


def test_decoder_layers_are_found_and_a_model_without_them_is_refused():
    assert len(decoder_layers(windowed_model("llama"))) == 2
    with pytest.raises(ValueError, match="trainer.compile=false"):
        compile_model(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    overrides = [*TINY, "loss=dpo", "hardware=cpu", "trainer.max_steps=3", "dynamics.enabled=false"]
    runs = {
        mode: run_train(tmp_path / mode, *overrides, f"trainer.compile={mode == 'compiled'}")
        for mode in ("eager", "compiled")
    }
    rows = {
        mode: [row for row in read_jsonl(run / "metrics.jsonl") if "train/loss" in row] for mode, run in runs.items()
    }
    assert len(rows["compiled"]) == len(rows["eager"]) == 3
    for compiled, eager in zip(rows["compiled"], rows["eager"]):
        for key in ("train/loss", "train/logps/chosen", "train/logps/rejected", "train/grad_norm"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-5), (compiled["step"], key)
    assert rows["compiled"][0]["train/compile_s"] > 0 and "train/compile_s" not in rows["eager"][0]
