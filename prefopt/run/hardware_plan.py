"""hardware=auto: the preset that fits a run on this machine (or the refusal that lists what would fit), chosen from
the estimates of run/resources.py, and the `${auto_hardware:KEY}` resolver that conf/hardware/auto.yaml uses.
See run/resources.py's docstring for the estimate and the rule."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from prefopt.conf import CONF_DIR
from prefopt.core.errors import ConfigError
from prefopt.run.resources import (
    GB,
    Limits,
    Machine,
    MemoryEstimate,
    Run,
    cpu_tflops,
    estimate_memory,
    fits,
    limits_from,
    run_shape,
    step_seconds,
    this_machine,
)
from prefopt.run.step_tokens import padded_to_max_length, step_tokens

log = logging.getLogger("prefopt")

AUTO_RESOLVER = "auto_hardware"  # conf/hardware/auto.yaml: `name: ${auto_hardware:name}` ...
HARDWARE_DIR = CONF_DIR / "hardware"
ASSUMED_GPU_BYTES = 80 * GB  # the GPU a refusal sizes its suggestions for when none is visible
SUGGESTED_GPU_COUNTS = (1, 2, 4, 8)  # one node's worth
WARN_MARGIN = 1.25  # an explicit preset warns when the estimate exceeds the memory by this factor


@dataclass(frozen=True)
class HardwarePlan:
    values: dict  # the hardware group's values (a preset's, plus chosen_by)
    estimate: Optional[MemoryEstimate]
    step_seconds: Optional[float]  # on the CPU only


# ---- presets and the plan ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _preset(name: str) -> tuple:
    return tuple(OmegaConf.to_container(OmegaConf.load(HARDWARE_DIR / f"{name}.yaml")).items())


def preset_values(name: str, gpus: int = 1) -> dict:
    """conf/hardware/NAME.yaml's values (the one place they are written); multi-GPU presets get gpus_per_node."""
    values = dict(_preset(name))
    if values["launcher"] == "torchrun" and values["device"] == "cuda":
        values["gpus_per_node"] = gpus
    values.setdefault("peak_tflops", None)
    values["chosen_by"] = None
    return values


def preset_overrides(values: Mapping[str, Any]) -> str:
    """The command-line overrides that select these values."""
    text = f"hardware={values['name']}"
    return text + (f" hardware.gpus_per_node={values['gpus_per_node']}" if values["gpus_per_node"] > 1 else "")


def gpu_presets(count: int, offload: bool = False) -> list[dict]:
    """One GPU: the plain `gpu` preset (ZeRO partitions nothing over one rank); several: ZeRO-1, 2, 3, smallest
    first."""
    if offload:
        return [preset_values("zero3_offload", gpus=count)]
    if count == 1:
        return [preset_values("gpu")]
    return [preset_values(f"zero{stage}", gpus=count) for stage in (1, 2, 3)]


def auto_candidates(machine: Machine) -> list[dict]:
    """The CPU first (reproducible, no GPU needed), then all visible GPUs."""
    return [preset_values("cpu"), *(gpu_presets(len(machine.gpu_bytes)) if machine.gpu_bytes else [])]


def first_fit(run: Run, machine: Machine, limits: Limits) -> Optional[HardwarePlan]:
    for values in auto_candidates(machine):
        estimate = estimate_memory(run, values)
        seconds = step_seconds(run, cpu_tflops(machine, limits)) if values["device"] == "cpu" else None
        if fits(estimate, machine, limits) and (seconds is None or seconds <= limits.max_cpu_step_seconds):
            return HardwarePlan(
                dict(values, chosen_by="auto: " + describe_fit(estimate, machine, seconds, run)), estimate, seconds
            )
    return None


def describe_fit(estimate: MemoryEstimate, machine: Machine, seconds: Optional[float], run: Run) -> str:
    if estimate.device == "cpu":
        ram = machine.ram_bytes / GB
        return (
            f"~{estimate.total / GB:.1f} GB estimated peak on the CPU ({ram:.1f} GB RAM), ~{duration(seconds)} s per "
            f"step, {run.tokens_basis}"
        )
    gpu = min(machine.gpu_bytes) / GB
    return (
        f"~{estimate.total / GB:.1f} GB estimated peak per GPU ({estimate.ranks_per_node} x {gpu:.0f} GB), "
        f"{run.tokens_basis}"
    )


def duration(seconds: float) -> str:
    """Two significant figures at most, never "0": 66, 4.4, 0.02."""
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}" if seconds >= 0.1 else f"{seconds:.2g}"


def estimated_run(cfg: DictConfig, machine: Machine, limits: Limits) -> Run:
    """The run's shape with its token counts from the data (run/step_tokens.py); at dataset.max_length, without
    reading the data, when the weights alone already fit nowhere here (an 8B model on a laptop is refused in
    seconds, offline, before its tokenizer is looked for)."""
    bound = run_shape(cfg, padded_to_max_length(cfg, "the weights alone fit nowhere here, so the data was not read"))
    weights_only = dataclasses.replace(bound, tokens=0, scored_tokens=0, step_tokens=0.0)
    if first_fit(weights_only, machine, limits) is None:
        return bound
    return run_shape(cfg, step_tokens(cfg))


def plan_hardware(run: Run, machine: Machine, limits: Limits) -> HardwarePlan:
    """The preset hardware=auto runs `run` on; ConfigError naming what would fit when nothing here does."""
    plan = first_fit(run, machine, limits)
    if plan is None:
        raise ConfigError(refusal(run, machine, limits))
    return plan


def gpu_fit(run: Run, gpu_bytes: int, limits: Limits, offload: bool) -> tuple[Optional[dict], MemoryEstimate]:
    """The fewest GPUs of gpu_bytes (then the smallest stage) that hold `run`; else (None, the largest try's
    estimate)."""
    for count in SUGGESTED_GPU_COUNTS:
        node = Machine(
            ram_bytes=2**62, cpu_cores=1, gpu_bytes=(gpu_bytes,) * count
        )  # a node's RAM is unknown: shown, not checked
        for values in gpu_presets(count, offload):
            estimate = estimate_memory(run, values)
            if fits(estimate, node, limits):
                return values, estimate
    return None, estimate


def suggestion(overrides: str, run: Run, machine: Machine, limits: Limits, offload: bool = False) -> str:
    """One line of a refusal: the overrides, the estimate per rank, and where that fits."""
    here = None if offload else first_fit(run, machine, limits)
    if here is not None:
        chosen_by = here.values["chosen_by"].removeprefix("auto: ")
        return f"  {overrides}: fits here ({preset_overrides(here.values)}), {chosen_by}"
    gpu_bytes = min(machine.gpu_bytes) if machine.gpu_bytes else ASSUMED_GPU_BYTES
    values, estimate = gpu_fit(run, gpu_bytes, limits, offload)
    host = f" + {estimate.host_per_node / GB:.0f} GB CPU RAM" if estimate.host else ""
    if values is None:
        largest = preset_overrides(gpu_presets(SUGGESTED_GPU_COUNTS[-1], offload)[-1])
        return (
            f"  {' '.join(filter(None, [overrides, largest]))}: {estimate.total / GB:.1f} GB per GPU{host}, "
            f"more than {SUGGESTED_GPU_COUNTS[-1]} GPUs of {gpu_bytes / GB:.0f} GB hold"
        )
    count = values["gpus_per_node"]
    where = (
        "fits here"
        if count <= len(machine.gpu_bytes) and fits(estimate, machine, limits)
        else f"on {count} GPU{'s' if count > 1 else ''} of {gpu_bytes / GB:.0f} GB"
    )
    settings = " ".join(filter(None, [overrides, preset_overrides(values)]))
    return f"  {settings}: {estimate.total / GB:.1f} GB per GPU{host}, {where}"


def refusal(run: Run, machine: Machine, limits: Limits) -> str:
    """Why nothing here fits, and the alternatives with their estimates."""
    cpu = estimate_memory(run, preset_values("cpu"))
    seconds = step_seconds(run, cpu_tflops(machine, limits))
    lines = [
        f"hardware=auto: nothing on this machine ({machine.describe()}) fits model {run.name} "
        f"({run.arch.num_parameters / 1e9:.2f}e9 parameters, {run.dtype}). On the CPU it needs ~{cpu.total / GB:.1f} "
        f"GB ({cpu.breakdown()}) of {limits.usable_memory_fraction * machine.ram_bytes / GB:.1f} GB usable "
        f"(hardware.usable_memory_fraction={limits.usable_memory_fraction:g}) and ~{duration(seconds)} s per step "
        f"(hardware.max_cpu_step_seconds={limits.max_cpu_step_seconds:g}); tokens counted {run.tokens_basis}.",
    ]
    if machine.gpu_bytes:
        largest = auto_candidates(machine)[-1]
        estimate = estimate_memory(run, largest)
        lines.append(
            f"On the visible GPUs, {preset_overrides(largest)} needs ~{estimate.total / GB:.1f} GB per GPU "
            f"({estimate.breakdown()})."
        )
    lines.append("What would fit (estimated peak memory per rank; GB = 2^30 bytes):")
    lines.append(suggestion("", run, machine, limits))
    lines.append(suggestion("", run, machine, limits, offload=True))
    if not run.lora:
        lines.append(
            suggestion(
                "model.lora.enabled=true", dataclasses.replace(run, lora=True, holds_reference=False), machine, limits
            )
        )
    if run.reference_forward:
        precomputed = dataclasses.replace(run, reference_forward=False, holds_reference=False)
        lines.append(suggestion("reference.precompute=true", precomputed, machine, limits))
    lines.append(
        "Run it where that fits, or name a preset yourself (hardware=cpu | gpu | zero1 | zero2 | zero3 | "
        "zero3_offload): an explicit preset runs, with a warning when it looks too small."
    )
    return "\n".join(lines)


# ---- the config side: the resolver, and settling the choice before the run dir is frozen -------------


def placeholder_plan(reason: str) -> HardwarePlan:
    """What `--cfg job` shows when auto has no choice: the cpu values under the name auto; `prefopt train` refuses."""
    return HardwarePlan(dict(preset_values("cpu"), name="auto", chosen_by=f"auto: {reason}"), None, None)


@functools.lru_cache(maxsize=64)
def lenient_plan(run: Run, limits: Limits, machine: Machine) -> HardwarePlan:
    plan = first_fit(run, machine, limits)
    if plan is None:
        needed = estimate_memory(run, preset_values("cpu")).total / GB
        return placeholder_plan(
            f"nothing here fits (~{needed:.1f} GB on the CPU); `prefopt train` refuses and lists what would"
        )
    return plan


def auto_hardware_value(key: str, _root_: DictConfig) -> Any:
    """`${auto_hardware:KEY}`: KEY of the preset hardware=auto chooses for this config (never raises: see
    settle_hardware)."""
    try:
        machine, limits = this_machine(), limits_from(_root_.hardware)
        plan = lenient_plan(estimated_run(_root_, machine, limits), limits, machine)
    except ConfigError as error:
        plan = placeholder_plan(f"{str(error).split(':')[0]}; `prefopt train` refuses and says why")
    return plan.values[key]


def uses_auto(hardware: DictConfig) -> list[str]:
    """The hardware keys still set by hardware=auto (the user's own overrides replace theirs)."""
    raw = OmegaConf.to_container(hardware, resolve=False)
    return [
        key for key, value in raw.items() if isinstance(value, str) and value.startswith("${" + AUTO_RESOLVER + ":")
    ]


def settle_hardware(cfg: DictConfig, machine: Optional[Machine] = None) -> Optional[HardwarePlan]:
    """Before the run dir is frozen: hardware=auto becomes the preset it chooses (ConfigError when nothing fits);
    an explicit preset that clearly cannot hold the run gets a warning, and runs."""
    machine = machine or this_machine()
    auto_keys = uses_auto(cfg.hardware)
    if not auto_keys:
        warn_if_too_small(cfg, machine)
        return None
    limits = limits_from(cfg.hardware)
    plan = plan_hardware(estimated_run(cfg, machine, limits), machine, limits)
    for key in auto_keys:
        cfg.hardware[key] = plan.values[key]
    log.info("hardware=auto chose %s: %s", preset_overrides(plan.values), plan.values["chosen_by"])
    return plan


def memory_need(run: Run, hardware: DictConfig, machine: Machine) -> tuple[float, float, str, MemoryEstimate]:
    """(bytes needed, bytes there, where, the estimate) of `run` on an explicit preset."""
    estimate = estimate_memory(run, hardware)
    if estimate.device == "cuda" and machine.gpu_bytes:
        return estimate.total, min(machine.gpu_bytes), "per GPU", estimate
    return estimate.host_per_node, machine.ram_bytes, "of CPU memory", estimate


def warn_if_too_small(cfg: DictConfig, machine: Machine) -> None:
    hardware = cfg.hardware
    if hardware.launcher == "slurm":  # its memory is on the cluster's nodes, not here
        return
    try:
        run = run_shape(cfg)  # at dataset.max_length first: the data is read only when that bound does not fit
        need, have, where, estimate = memory_need(run, hardware, machine)
        if need > WARN_MARGIN * have:
            run = run_shape(cfg, step_tokens(cfg))
            need, have, where, estimate = memory_need(run, hardware, machine)
    except ConfigError:  # figures unknown: nothing to compare
        return
    if need > WARN_MARGIN * have:
        log.warning(
            "hardware=%s: this run needs ~%.1f GB %s by estimate (%s) and this machine has %.1f GB: it will likely "
            "run out of memory. hardware=auto picks what fits, or lists it.",
            hardware.name,
            need / GB,
            where,
            estimate.breakdown(),
            have / GB,
        )
