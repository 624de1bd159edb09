"""Small trainer pieces found wrong in review: gate/min is a global minimum, FLOPs count frozen
(LoRA) parameters right, and every RNG a step draws from is saved and restored."""

from __future__ import annotations

import random

import numpy
import pytest
import torch

from prefopt.core.distributed import DistInfo
from prefopt.train.flops import step_model_flops
from prefopt.train.metrics import reduce_loss_metrics
from prefopt.train.rng import restore_rng_states, rng_states


def test_gate_min_is_the_minimum_over_the_whole_batch_not_a_mean_of_minimums():
    micro_batches = [{"gate/min": 0.30, "gate/mean": 0.50}, {"gate/min": 0.10, "gate/mean": 0.70}]
    reduced = reduce_loss_metrics(micro_batches, DistInfo())
    assert reduced["train/gate/min"] == pytest.approx(0.10)
    assert reduced["train/gate/mean"] == pytest.approx(0.60)


def test_flops_count_weight_gradients_only_for_trainable_parameters():
    full = step_model_flops(num_params=1000, trainable_params=1000, policy_tokens=10, reference_forward=True)
    assert full == 8 * 1000 * 10  # 6N + 2N reference forward
    lora = step_model_flops(num_params=1000, trainable_params=10, policy_tokens=10, reference_forward=True)
    assert (
        lora == (2 + 2 + 2) * 1000 * 10 + 2 * 10 * 10
    )  # forward, activation backward, reference; weight grads of adapters only


def test_rng_states_round_trip_torch_numpy_and_python():
    states = rng_states()
    drawn = (torch.rand(3), numpy.random.rand(3), random.random())
    restore_rng_states(states)
    again = (torch.rand(3), numpy.random.rand(3), random.random())
    assert torch.equal(drawn[0], again[0]) and numpy.array_equal(drawn[1], again[1]) and drawn[2] == again[2]
    assert "cuda" in states  # saved (empty without CUDA) and restored where a device exists


def test_step_guard_counts_skips_stops_after_too_many_and_warns_once_on_a_zero_gradient_norm(caplog):
    from prefopt.core.errors import NonFiniteTrainingError
    from prefopt.train.guards import StepGuard

    guard = StepGuard(max_consecutive_skips=3)
    guard.after_step(1, applied=False, grad_norm=float("nan"))
    guard.after_step(2, applied=True, grad_norm=0.5)  # a good step resets the run of skips
    guard.after_step(3, applied=False, grad_norm=float("inf"))
    guard.after_step(4, applied=False, grad_norm=float("nan"))
    assert guard.skipped_steps == 3 and guard.consecutive_skips == 2
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive steps up to step 5"):
        guard.after_step(5, applied=False, grad_norm=float("nan"))

    guard = StepGuard(max_consecutive_skips=3)
    with caplog.at_level("WARNING", logger="prefopt"):
        for step in range(1, 8):
            guard.after_step(step, applied=True, grad_norm=0.0)
    assert sum("exactly 0" in record.message for record in caplog.records) == 1
