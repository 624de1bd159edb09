"""Model FLOPs of a training step, for the logged train/tflops and MFU (nanoGPT-style: achieved model FLOPs over the
device's peak), and the parameter counts they are made of."""

from __future__ import annotations

from typing import Optional

import torch
from omegaconf import DictConfig

# bf16 dense peak TFLOP/s per device, for MFU (nanoGPT-style: achieved model FLOPs / peak)
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(hardware_cfg: DictConfig, device: torch.device) -> Optional[float]:
    """hardware.peak_tflops, else the known GPU's bf16 dense peak; None (no MFU) on a CPU or an unknown GPU."""
    if hardware_cfg.peak_tflops:
        return hardware_cfg.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), None)
    return None


def step_model_flops(num_params: int, trainable_params: int, policy_tokens: int, reference_forward: bool) -> float:
    """Per token: 2 N for the policy's forward, 2 N for the backward through the activations (every
    layer, frozen or not), 2 N_trainable for the weight gradients (6 N for a full fine-tune, ~4 N under
    LoRA), and 2 N more for a reference forward."""
    return (4 * num_params + 2 * trainable_params + (2 * num_params if reference_forward else 0)) * policy_tokens


def count_parameters(model, hardware_cfg: DictConfig) -> tuple[int, int]:
    """(all, trainable) parameter counts; under ZeRO-3 from the partitioned parameters' full sizes."""

    def size(parameter) -> int:
        return (
            parameter.ds_numel
            if hardware_cfg.engine == "deepspeed" and hardware_cfg.zero_stage == 3
            else parameter.numel()
        )

    parameters = list(model.parameters())
    return sum(size(p) for p in parameters), sum(size(p) for p in parameters if p.requires_grad)
