"""What a training run needs (peak memory per rank, seconds per step), estimated from the model's
architecture figures before any weight loads, and the hardware that fits it (`hardware=auto`).

Why: an 8B model on the default one-process CPU preset used to load for minutes and then die (or
swap); the parent can tell in milliseconds that it cannot work, and what would.

The estimate (GB = 2^30 bytes; P = parameters, T = trained parameters: P, or the LoRA adapters' with
`model.lora.enabled`; N = ranks; s = ZeRO stage; h, I, L, V, kv = hidden size, MLP width, layers,
vocabulary, key/value width = kv heads x head size):

    bytes per parameter   weights w   grads g   optimizer o (Adam m+v, plus the fp32 master)
    torch engine          4           4         8    fp32 weights, also for model.dtype=bf16 (autocast compute)
    DeepSpeed fp32        4           4         8
    DeepSpeed bf16        2           2         12   bf16 params and grads + fp32 master + Adam
    o is AdamW's 8 (m, v in fp32); trainer.optimizer=adamw_8bit 2, adafactor ~0 (factored), sgd 0 (4 with
    trainer.momentum), plus DeepSpeed bf16's 4 B master. model.quantization (torch engine) stores the frozen base
    weights in 0.5 B (4bit) or 1 B (8bit) per parameter instead of 4.

    weights     = w*P / (N if s=3)  [+ w*(2 layers + V*h) gathered at a time under ZeRO-3]
    gradients   = g*T / (N if s>=2)            -> CPU memory too with hardware.offload_optimizer
    optimizer   = o*T / (N if s>=1)            -> CPU memory with hardware.offload_optimizer
    buckets     = 2 * min(5e8, T) * g          DeepSpeed's reduce/all-gather buckets (s>=1, N>1)
    reference   = 4*P (torch engine) or w*P (DeepSpeed; / N when the reference is ZeRO-3);
                  none with reference.precompute, a reference-free loss, or LoRA (the base is the reference)
    activations = tokens * (L+1) * a, tokens = positions of the run's largest micro batch (below),
                  a = 32h + 16I + 8kv bytes (fp32) or 30h + 8I + 4kv (bf16), measured with saved-tensor
                  hooks on Llama blocks; bf16 autocast also keeps 2 B/param bf16 copies of the weights;
                  model.gradient_checkpointing: tokens * (4h*L + a), each layer's input plus one layer recomputed
    logp buffers = 4 x min(trainer.logp_chunk_size, scored) x V x 4 B   (chunked fp32 log-softmax)
                   + min(trainer.logp_keep_mb, scored x V x 4 B)   (log-probs kept for backward)
                   scored = that micro batch's response tokens (the head runs on scored positions only)
    overhead    = 0.6 GB per CPU process (Python + torch + transformers + DeepSpeed: the tiny_llama run's
                  peak RSS) + 4*P (the weights' copy from loading, which the RSS high-water mark keeps), or
                  1.5 GB per GPU (CUDA context, cuBLAS workspace, allocator slack)

    seconds per step = (6 + 2 [reference forward] + 2 [gradient checkpointing]) x P x step tokens
                       / (hardware.cpu_tflops_per_core x cores x 1e12),  step tokens = mean positions per step

The token counts come from the data (run/step_tokens.py): the micro batches the run's sampler will draw, each
sized in the run's layout (packed rows or padded ones, padding included); memory takes the largest, time the mean
step. Where the data cannot be read before launch, every sequence is counted at dataset.max_length (an upper
bound) and `chosen_by` says so. Loading transients are not modelled.

`hardware=auto` (conf/hardware/auto.yaml) picks, per job: the `cpu` preset when the run fits in
hardware.usable_memory_fraction of this machine's RAM and a step takes at most
hardware.max_cpu_step_seconds; otherwise every visible GPU with the smallest preset that fits (one
GPU: `gpu`; several: `zero1`, `zero2`, `zero3` with gpus_per_node = their number); otherwise it
refuses (ConfigError) and lists what would fit, with the estimates. Its keys are `${auto_hardware:KEY}`
interpolations, so each job of a sweep resolves its own choice; `prepare_run` replaces them by the
chosen preset's values before the run dir is frozen, so a worker never sees `auto`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.losses import loss_plan_of
from prefopt.model.loading import lora_targets
from prefopt.model.naming import model_name
from prefopt.run.step_tokens import StepTokens, padded_to_max_length
from prefopt.train.reference_sync import reference_moves

log = logging.getLogger("prefopt")

GB = 2**30  # as nvidia-smi and `free -g` count: an "80 GB" GPU has 80 of these
CPU_PROCESS_BYTES = 6 * GB // 10  # peak RSS of a 6-step tiny_llama run (0.56 GB), i.e. the libraries alone
# a CPU process's RSS high-water mark keeps one more fp32 copy of the weights from loading them (the state dict
# beside the module): scripts/bench_estimate.py measured SmolLM2-135M runs 0.32-0.41 GB above the other terms
LOADED_COPY_BYTES = 4
GPU_CONTEXT_BYTES = 3 * GB // 2  # CUDA context + cuBLAS workspace + caching-allocator slack
LOGP_BUFFERS = 4  # chunk logits, their log-softmax, and the backward's recomputed copy and gradient
DEEPSPEED_BUCKET = 500_000_000  # elements in DeepSpeed's default reduce / all-gather buckets
BYTE_TOKENIZER_VOCAB = 260  # 256 bytes + 4 specials: prefopt.model.loading.build_byte_tokenizer (tiny models)


@dataclass(frozen=True)
class Arch:
    """The figures of a decoder-only transformer that memory and FLOPs depend on."""

    num_parameters: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_word_embeddings: bool

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * (self.hidden_size // self.num_heads)

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def layer_parameters(self) -> int:
        return max(0, self.num_parameters - self.embedding_parameters) // self.num_layers


def llama_parameters(
    hidden: int, layers: int, vocab: int, heads: int, kv_heads: int, intermediate: int, tied: bool
) -> int:
    """Parameters of a Llama-style decoder (q/k/v/o, gated MLP, RMSNorms), for figures without a count."""
    kv_width = kv_heads * (hidden // heads)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


@dataclass(frozen=True)
class Run:
    """What the estimate reads from a config: the model, the batch, and which copies are held."""

    name: str  # model preset, for messages
    arch: Arch
    dtype: str  # fp32 | bf16
    lora: bool  # model.lora.enabled: only the adapters train
    adapter_parameters: int  # what model.lora's settings add (counted whether enabled or not, for suggestions)
    reference_forward: bool  # a reference forward runs every step
    holds_reference: bool  # a second, frozen copy of the model is in memory
    reference_offload: bool  # reference.offload
    tokens: int  # positions of the largest micro batch, padding included (run/step_tokens.py)
    scored_tokens: int  # response tokens of that micro batch: the head runs on these
    step_tokens: float  # positions per optimizer step (all its micro batches), on average over the run
    tokens_basis: str  # where those counts come from: the data's lengths, or dataset.max_length and why
    gradient_checkpointing: bool
    logp_chunk_size: int
    logp_keep_bytes: float  # trainer.logp_keep_mb: log-probs a step keeps for backward instead of recomputing the head
    optimizer_state_bytes: float = 8  # per trained parameter (OPTIMIZER_STATE_BYTES: AdamW's m and v in fp32)
    base_weight_bytes: float = 4  # per frozen base parameter on the torch engine: fp32, or model.quantization's size

    @property
    def trained_parameters(self) -> int:
        return self.adapter_parameters if self.lora else self.arch.num_parameters


@dataclass(frozen=True)
class Limits:
    """hardware.max_cpu_step_seconds, cpu_tflops_per_core, usable_memory_fraction."""

    max_cpu_step_seconds: float
    cpu_tflops_per_core: float
    usable_memory_fraction: float


@dataclass(frozen=True)
class Machine:
    ram_bytes: int
    cpu_cores: int
    gpu_bytes: tuple[int, ...] = ()  # total memory of each visible GPU

    def describe(self) -> str:
        if not self.gpu_bytes:
            gpus = "no GPU"
        else:
            plural = "s" if len(self.gpu_bytes) > 1 else ""
            gpus = f"{len(self.gpu_bytes)} GPU{plural} of {min(self.gpu_bytes) / GB:.0f} GB"
        return f"{self.ram_bytes / GB:.1f} GB RAM, {self.cpu_cores} CPU cores, {gpus}"


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes per rank on its device, by part; `host` is what offloading puts in CPU memory per rank."""

    device: str  # cpu | cuda
    ranks_per_node: int
    weights: float
    gradients: float
    optimizer: float
    buckets: float
    reference: float
    activations: float
    logp_buffers: float
    overhead: float
    host: float = 0.0

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.buckets
            + self.reference
            + self.activations
            + self.logp_buffers
            + self.overhead
        )

    @property
    def host_per_node(self) -> float:
        """CPU memory of one node: every rank's process (its whole estimate when it runs on the CPU) plus offloads."""
        per_rank = self.total if self.device == "cpu" else CPU_PROCESS_BYTES
        return self.ranks_per_node * (per_rank + self.host)

    def breakdown(self) -> str:
        parts = ("weights", "gradients", "optimizer", "buckets", "reference", "activations", "logp_buffers", "overhead")
        shown = [
            f"{part.replace('_', ' ')} {getattr(self, part) / GB:.1f}"
            for part in parts
            if getattr(self, part) >= 0.05 * GB
        ]
        return ", ".join(shown)


# ---- architecture figures ---------------------------------------------------------------------------

ARCH_FIGURES = ("hidden_size", "num_layers", "vocab_size", "num_heads", "intermediate_size")


def arch_from_figures(figures: Mapping[str, Any]) -> Arch:
    """An Arch from `model.arch`-style figures; num_parameters is counted Llama-style when absent."""
    heads = figures["num_heads"]
    # Arch's fields after num_parameters, in order; llama_parameters takes the same
    shape = (
        figures["hidden_size"],
        figures["num_layers"],
        figures["vocab_size"],
        heads,
        figures.get("num_kv_heads") or heads,
        figures["intermediate_size"],
        bool(figures.get("tie_word_embeddings")),
    )
    return Arch(int(figures.get("num_parameters") or llama_parameters(*shape)), *shape)


def first_present(config: Mapping[str, Any], *keys: str) -> Any:
    return next((config[key] for key in keys if config.get(key) is not None), None)


@functools.lru_cache(maxsize=16)
def directory_figures(directory: str) -> tuple:
    """Figures from a saved HF model's config.json (no weights read), the count from its safetensors headers."""
    config = json.loads((Path(directory) / "config.json").read_text())
    config = config.get("text_config") or config  # multimodal wrappers keep the decoder's figures there
    hidden = first_present(config, "hidden_size", "n_embd", "d_model")
    figures = {
        "num_parameters": safetensors_parameters(Path(directory)),
        "hidden_size": hidden,
        "num_layers": first_present(config, "num_hidden_layers", "n_layer", "num_layers"),
        "vocab_size": config.get("vocab_size"),
        "num_heads": first_present(config, "num_attention_heads", "n_head"),
        "num_kv_heads": 1 if config.get("multi_query") else first_present(config, "num_key_value_heads"),
        "intermediate_size": first_present(config, "intermediate_size", "n_inner", "ffn_dim")
        or (4 * hidden if hidden else None),
        "tie_word_embeddings": config.get("tie_word_embeddings", True),  # transformers' default
    }
    return tuple(figures.items())


def safetensors_parameters(directory: Path) -> Optional[int]:
    """Sum of the tensor sizes in the safetensors headers (8-byte length + JSON): exact for any architecture."""
    total = 0
    files = sorted(directory.glob("*.safetensors"))
    for path in files:
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        total += sum(math.prod(tensor["shape"]) for key, tensor in header.items() if key != "__metadata__")
    return total or None


def model_arch(model_cfg: DictConfig) -> Arch:
    """The model's figures: model.tiny (random models), else a local model.path's config.json and the preset's
    model.arch."""
    if model_cfg.source == "tiny":
        tiny = model_cfg.tiny
        return arch_from_figures(
            {
                "hidden_size": tiny.hidden_size,
                "num_layers": tiny.num_layers,
                "vocab_size": tiny.vocab_size or BYTE_TOKENIZER_VOCAB,
                "num_heads": tiny.num_heads,
                "intermediate_size": tiny.intermediate_size,
                "tie_word_embeddings": True,
            }
        )
    figures = OmegaConf.to_container(model_cfg.arch)
    path = os.path.expanduser(model_cfg.path) if model_cfg.path else None
    if path and os.path.isfile(
        os.path.join(path, "config.json")
    ):  # the model itself: its figures win, model.arch fills gaps
        local = {key: value for key, value in directory_figures(os.path.abspath(path)) if value is not None}
        figures = {**figures, "num_parameters": None, **local}  # the preset's count is another model's
    missing = [key for key in ARCH_FIGURES if not figures.get(key)]
    if missing:
        raise ConfigError(
            f"hardware=auto cannot estimate the memory of model {model_cfg.name} ({model_cfg.path}): "
            f"model.arch.{missing[0]} is not set. Give the figures from the model's config.json "
            "(model.arch.hidden_size=... num_layers, vocab_size, num_heads, num_kv_heads, intermediate_size, "
            "num_parameters), point model.path at a local directory with config.json, or choose the hardware "
            "yourself (hardware=cpu | gpu | zero1 | zero2 | zero3 | zero3_offload)"
        )
    return arch_from_figures(figures)


LORA_SHAPES = {  # module name -> (in, out) in units of (h, I, kv, 3h); unknown names count as h x h
    "q_proj": ("h", "h"),
    "k_proj": ("h", "kv"),
    "v_proj": ("h", "kv"),
    "o_proj": ("h", "h"),
    "gate_proj": ("h", "I"),
    "up_proj": ("h", "I"),
    "down_proj": ("I", "h"),
    "query_key_value": ("h", "3h"),
    "dense": ("h", "h"),
    "dense_h_to_4h": ("h", "I"),
    "dense_4h_to_h": ("I", "h"),
}


# model.lora.target_modules=all-linear: PEFT adapts every linear layer but the output head; in a Llama-style decoder
# (the estimate's model) those are the attention and gated-MLP projections
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_parameters(arch: Arch, rank: int, target_modules: str | list[str]) -> int:
    """r x (in + out) per adapted module per layer."""
    if target_modules == "all-linear":
        target_modules = list(ALL_LINEAR)
    width = {"h": arch.hidden_size, "I": arch.intermediate_size, "kv": arch.kv_width, "3h": 3 * arch.hidden_size}
    per_layer = sum(rank * sum(width[side] for side in LORA_SHAPES.get(name, ("h", "h"))) for name in target_modules)
    return arch.num_layers * per_layer


# bytes of optimizer state per trained parameter, by trainer.optimizer (without DeepSpeed's fp32 master copy)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "adafactor": 0, "sgd": 0}  # adafactor: factored, ~0 per param
QUANTIZED_WEIGHT_BYTES = {"4bit": 0.5, "8bit": 1}  # model.quantization (bitsandbytes NF4 / int8)


def run_shape(cfg: DictConfig, tokens: Optional[StepTokens] = None) -> Run:
    """The estimate's inputs from a composed config (model, reference, loss) and the run's token counts (None: every
    sequence at dataset.max_length, the upper bound that needs no data)."""
    tokens = tokens or padded_to_max_length(cfg, "the data's lengths not asked for")

    model = cfg.model
    arch = model_arch(model)
    # a live reference every step: precompute off, or a moving reference (TR-DPO), which cannot be cached
    live_reference = str(cfg.reference.precompute).lower() not in ("auto", "true") or reference_moves(cfg)
    reference_forward = loss_plan_of(cfg.loss).needs_reference and live_reference
    return Run(
        name=model_name(model),
        arch=arch,
        dtype=model.dtype,
        lora=model.lora.enabled,
        adapter_parameters=lora_parameters(arch, model.lora.r, lora_targets(model.lora.target_modules)),
        reference_forward=reference_forward,
        holds_reference=reference_forward and not model.lora.enabled,
        reference_offload=cfg.reference.offload,
        tokens=tokens.micro_batch,
        scored_tokens=tokens.scored,
        step_tokens=tokens.per_step,
        tokens_basis=tokens.basis,
        gradient_checkpointing=model.gradient_checkpointing,
        logp_chunk_size=cfg.trainer.logp_chunk_size,
        logp_keep_bytes=cfg.trainer.logp_keep_mb * 2**20,
        # hardware=auto resolves before validation: an unknown optimizer counts as AdamW until validate_config names it
        optimizer_state_bytes=OPTIMIZER_STATE_BYTES.get(cfg.trainer.optimizer, 8) + 4 * (cfg.trainer.momentum > 0),
        base_weight_bytes=QUANTIZED_WEIGHT_BYTES.get(model.quantization, 4),
    )


def limits_from(hardware: DictConfig) -> Limits:
    return Limits(hardware.max_cpu_step_seconds, hardware.cpu_tflops_per_core, hardware.usable_memory_fraction)


# ---- the estimate -----------------------------------------------------------------------------------


def activation_bytes(run: Run, autocast: bool) -> float:
    """Tensors saved for backward (Llama blocks, SDPA: no seq^2 term), measured per token and layer."""
    arch = run.arch
    h, width, kv = arch.hidden_size, arch.intermediate_size, arch.kv_width
    per_token_layer = (30 * h + 8 * width + 4 * kv) if run.dtype == "bf16" else (32 * h + 16 * width + 8 * kv)
    one_layer = run.tokens * per_token_layer
    if run.gradient_checkpointing:
        saved = run.tokens * 4 * h * arch.num_layers + one_layer  # every layer's input, and one layer recomputed
        weight_copies = arch.layer_parameters
    else:
        saved = (arch.num_layers + 1) * one_layer  # + one layer's worth of backward transients
        weight_copies = arch.num_parameters - arch.embedding_parameters
    return saved + (2 * weight_copies if autocast else 0)  # autocast keeps bf16 copies of the weights for backward


def estimate_memory(run: Run, hardware: Mapping[str, Any]) -> MemoryEstimate:
    """Peak memory per rank of `run` on `hardware` (a hardware group's values): see the module docstring."""
    arch = run.arch
    params, trained = arch.num_parameters, run.trained_parameters
    ranks = hardware["gpus_per_node"] * hardware["nodes"]
    deepspeed = hardware["engine"] == "deepspeed"
    stage = hardware["zero_stage"] if deepspeed else 0
    weight_bytes, grad_bytes, master_bytes = (2, 2, 4) if deepspeed and run.dtype == "bf16" else (4, 4, 0)
    optimizer_bytes = master_bytes + run.optimizer_state_bytes

    def shard(size: float, partitioned: bool) -> float:
        return size / ranks if partitioned else size

    base_bytes = weight_bytes if deepspeed else run.base_weight_bytes  # quantized weights: the torch engine only
    weights = shard(base_bytes * params + weight_bytes * (run.adapter_parameters if run.lora else 0), stage == 3)
    gradients = shard(grad_bytes * trained, stage >= 2)
    optimizer = shard(optimizer_bytes * trained, stage >= 1)
    host = 0.0
    if stage >= 2 and hardware["offload_optimizer"]:  # the CPU optimizer steps on gradient partitions in CPU memory too
        host, optimizer, gradients = host + optimizer + gradients, 0.0, 0.0
    if stage == 3 and hardware["offload_params"]:
        host, weights = host + weights, 0.0
    if stage == 3:  # layers are gathered whole while they run (and prefetched), the embedding too
        weights += weight_bytes * (2 * arch.layer_parameters + arch.vocab_size * arch.hidden_size)
    buckets = 2 * min(DEEPSPEED_BUCKET, trained) * grad_bytes if deepspeed and stage >= 1 and ranks > 1 else 0.0
    reference = 0.0
    if (
        run.holds_reference
    ):  # engine.py: an inference engine, ZeRO-3 when the policy is, unless reference_zero_stage says
        reference_stage = hardware.get("reference_zero_stage") if deepspeed else 0
        if reference_stage is None:
            reference_stage = 3 if stage == 3 else 0
        reference = shard((weight_bytes if deepspeed else 4) * params, reference_stage == 3)
        if reference_stage == 3 and (run.reference_offload or hardware["offload_params"]):
            host, reference = host + reference, 0.0
    on_gpu = hardware["device"] == "cuda"
    return MemoryEstimate(
        device=hardware["device"],
        ranks_per_node=hardware["gpus_per_node"],
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        buckets=buckets,
        reference=reference,
        activations=activation_bytes(run, autocast=run.dtype == "bf16" and not deepspeed),
        logp_buffers=LOGP_BUFFERS * min(run.logp_chunk_size, run.scored_tokens) * arch.vocab_size * 4
        + min(run.logp_keep_bytes, run.scored_tokens * arch.vocab_size * 4),
        overhead=GPU_CONTEXT_BYTES if on_gpu else CPU_PROCESS_BYTES + LOADED_COPY_BYTES * params,
        host=host,
    )


def step_seconds(run: Run, tflops: float) -> float:
    """~2 FLOPs per parameter and token forward, 4 backward; a reference forward and a recompute add 2 each."""
    flops_per_token = (6 + 2 * run.reference_forward + 2 * run.gradient_checkpointing) * run.arch.num_parameters
    return flops_per_token * run.step_tokens / (tflops * 1e12)


def cpu_tflops(machine: Machine, limits: Limits) -> float:
    return limits.cpu_tflops_per_core * machine.cpu_cores


def fits(estimate: MemoryEstimate, machine: Machine, limits: Limits) -> bool:
    """Within usable_memory_fraction of the RAM (every rank of the node) and of the smallest GPU."""
    usable = limits.usable_memory_fraction
    if estimate.host_per_node > usable * machine.ram_bytes:
        return False
    if estimate.device == "cpu":
        return True
    return len(machine.gpu_bytes) >= estimate.ranks_per_node and estimate.total <= usable * min(machine.gpu_bytes)


# ---- the machine ------------------------------------------------------------------------------------


def memory_limit_bytes() -> int:
    """Physical RAM, or the container's cgroup limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def visible_gpu_bytes() -> tuple[int, ...]:
    """Each visible GPU's memory (CUDA_VISIBLE_DEVICES applies): no CUDA work beyond reading the device properties."""
    import torch

    if not torch.cuda.is_available():
        return ()
    return tuple(torch.cuda.get_device_properties(index).total_memory for index in range(torch.cuda.device_count()))


@functools.lru_cache(maxsize=1)
def this_machine() -> Machine:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Machine(ram_bytes=memory_limit_bytes(), cpu_cores=cores, gpu_bytes=visible_gpu_bytes())
