"""A user's own model (model=hf model.path=DIR), LoRA on all-linear, QLoRA and trainer.optimizer: the run names the
directory it trained and counts its parameters right, the counts agree with PEFT's and the hardware estimate's, each
optimizer updates as its rule says, and what cannot run here is refused in one line."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.core.errors import ConfigError
from prefopt.model import quantization
from prefopt.model.loading import apply_lora, build_byte_tokenizer, load_model, resolve_model_source
from prefopt.model.naming import human_count
from prefopt.run.config import validate_config
from prefopt.run.modelcard import base_model_text
from prefopt.run.resources import lora_parameters, model_arch
from prefopt.train.engine import TorchEngine
from tests.helpers import preset, run_train, tiny_byte_llama, trainer_node
from tests.test_config import compose_config

HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None


def save_tiny_model(directory, hidden_size: int = 32):
    """A tiny random Llama and its byte tokenizer, saved as a user's HF directory; returns its parameter count."""
    tokenizer = build_byte_tokenizer()
    model = tiny_byte_llama(tokenizer)
    if hidden_size != 32:  # bitsandbytes' CPU 4-bit kernels take blocks of 64 inputs
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden_size,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=2 * hidden_size,
                max_position_embeddings=256,
            )
        )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models") / "MyTinyChat"
    return directory, save_tiny_model(directory)


def test_model_hf_trains_a_local_dir_and_names_it(tmp_path, model_dir):
    directory, count = model_dir
    run_dir = run_train(
        tmp_path / "run",
        "model=hf",
        f"model.path={directory}",
        "model.lora.enabled=true",  # target_modules: all-linear, the preset's
        "hardware=cpu",
        "logger.wandb.mode=disabled",
        "trainer.max_steps=1",
        "trainer.micro_batch_size=2",
        "dataset.arith.num_train=8",
        "dataset.arith.num_eval=2",
        "trainer.greedy_eval_examples=0",
        "dynamics.enabled=false",
        "trainer.save_final=false",
    )
    [line] = [line for line in (run_dir / "cli.log").read_text().splitlines() if "prefopt][INFO] - model: " in line]
    match = re.search(
        r"model: (\S+) \(sha ([0-9a-f]{8})\) (\S+) params fp32; LoRA r=16 on all-linear: (\S+) trainable", line
    )
    assert match, line
    base = tiny_byte_llama(build_byte_tokenizer())
    trainable = lora_count(base, 16)
    assert match.group(1) == str(directory) and match.group(3) == human_count(count)
    assert match.group(4) == human_count(trainable)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    text = base_model_text(cfg.model)
    assert text.startswith("`MyTinyChat` (LlamaForCausalLM; model_type llama)") and "hf" not in text.split(" at ")[0]


def lora_count(model, rank: int) -> int:
    """Trainable parameters after PEFT's all-linear LoRA, by PEFT's own count."""
    lora = OmegaConf.create({"r": rank, "alpha": 2 * rank, "dropout": 0.0, "target_modules": "all-linear"})
    wrapped = apply_lora(model, lora)
    trainable, _ = wrapped.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    return trainable


def test_all_linear_count_is_peft_s_and_the_estimate_s(model_dir):
    directory, _ = model_dir
    model_cfg = preset("model", "hf", path=str(directory))
    model = load_model(model_cfg, resolve_model_source(model_cfg), 260, seed=0)
    wrapped = apply_lora(model, OmegaConf.merge(model_cfg.lora, {"r": 4}))
    adapted = {
        name.rsplit(".lora_A", 1)[0].rsplit(".", 1)[-1] for name, _ in wrapped.named_modules() if "lora_A" in name
    }
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head
    peft_count, _ = wrapped.get_nb_trainable_parameters()
    assert lora_parameters(model_arch(model_cfg), 4, "all-linear") == peft_count


def test_gguf_preset_with_a_local_path_is_refused(model_dir):
    with pytest.raises(ConfigError, match=r"is not loaded by model=smollm2_135m .* use model=hf model.path=DIR"):
        validate_config(compose_config([f"model.path={model_dir[0]}"]))


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["model=hf"], "model.path is not set: model=hf"),
        (["model=hf", "model.path=/no/such/dir"], "model.path=/no/such/dir is not a directory"),
        (["model=hf", "model.path=/tmp"], "model.path=/tmp has no config.json"),
        (["trainer.optimizer=adam"], "trainer.optimizer='adam' is not a valid choice; use one of: adamw, adamw_8bit"),
        (["trainer.momentum=0.9"], "trainer.momentum=0.9 is SGD's"),
        (
            ["hardware=zero3_offload", "hardware.device=cpu", "trainer.optimizer=sgd"],
            "trainer.optimizer=sgd does not run with ZeRO-Offload",
        ),
        (["model.lora.target_modules=attn"], "model.lora.target_modules='attn' must be all-linear"),
        (["model.quantization=4bit"], "model.quantization=4bit freezes the base weights"),
        (["model=tiny_llama", "model.quantization=4bit", "model.lora.enabled=true"], "use model=hf model.path=DIR"),
        (["model.quantization=3bit"], "model.quantization='3bit' is not a valid choice; use one of: null, 4bit, 8bit"),
    ],
)
def test_bad_model_and_optimizer_settings_name_the_key(overrides, named):
    with pytest.raises(ConfigError) as error:
        validate_config(compose_config(overrides))
    assert named in str(error.value)


@pytest.mark.parametrize("version, says", [(None, "not installed"), ((0, 45), "runs only on a CUDA GPU")])
def test_bitsandbytes_uses_are_refused_where_it_cannot_run(monkeypatch, version, says):
    monkeypatch.setattr(quantization, "bitsandbytes_version", lambda: version)
    qlora = ["model.quantization=4bit", "model.lora.enabled=true", "hardware=cpu"]
    for overrides, setting in ((qlora, "model.quantization=4bit"), (["trainer.optimizer=adamw_8bit"], "adamw_8bit")):
        with pytest.raises(ConfigError, match=f"{setting}.*{says}"):
            validate_config(compose_config(overrides))


# ---------------------------------------------------------------- trainer.optimizer


def one_step(optimizer: str, **trainer):
    """(weights before, gradients, weights after) of one TorchEngine step of a tiny Llama on a fixed batch."""
    torch.manual_seed(0)
    model = tiny_byte_llama(build_byte_tokenizer())
    cfg = trainer_node(
        optimizer=optimizer, lr=0.01, warmup_steps=0, lr_schedule="constant", max_grad_norm=0.0, **trainer
    )
    engine = TorchEngine(model, cfg)
    ids = torch.arange(20).reshape(2, 10)
    model(input_ids=ids, labels=ids).loss.backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    engine.step()
    return engine, before, grads, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_sgd_step_is_p_minus_lr_grad():
    engine, before, grads, after = one_step("sgd")
    assert isinstance(engine.optimizer, torch.optim.SGD) and engine.lr == 0.01
    for name in before:
        torch.testing.assert_close(after[name], before[name] - 0.01 * grads[name], rtol=0, atol=1e-7)


def test_adafactor_takes_its_own_step_at_the_given_lr(tmp_path):
    engine, before, _, after = one_step("adafactor")
    _, _, _, adamw_after = one_step("adamw")
    assert engine.lr == 0.01  # relative_step=False: trainer.lr is the rate, not Adafactor's own schedule
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[name], before[name]) and not torch.allclose(after[name], adamw_after[name])
    # resume: the factored second moments come back from the checkpoint
    engine.save(tmp_path, build_byte_tokenizer())
    resumed = TorchEngine(tiny_byte_llama(build_byte_tokenizer()), trainer_node(optimizer="adafactor", lr=0.01))
    resumed.load(tmp_path)
    saved, loaded = engine.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and any("exp_avg_sq_row" in state for state in saved.values())
    for index, state in saved.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(loaded[index][key])), (index, key)


# ---------------------------------------------------------------- with bitsandbytes installed (pip install '.[qlora]')


@pytest.mark.skipif(not HAS_BITSANDBYTES, reason="bitsandbytes is not installed (pip install '.[qlora]')")
def test_qlora_and_adamw_8bit_train_the_adapters_only(tmp_path):
    count = save_tiny_model(tmp_path / "model", hidden_size=64)
    model_cfg = preset("model", "hf", path=str(tmp_path / "model"), quantization="4bit", lora={"enabled": True})
    validate_config(
        compose_config(
            [
                "model=hf",
                f"model.path={tmp_path / 'model'}",
                "model.quantization=4bit",
                "model.lora.enabled=true",
                "trainer.optimizer=adamw_8bit",
                "hardware=cpu",
            ]
        )
    )
    source = resolve_model_source(model_cfg)
    assert source.identity.endswith("|4bit")  # its reference log-probs are cached apart from the fp32 model's
    model = apply_lora(load_model(model_cfg, source, 260, seed=0), model_cfg.lora)
    import bitsandbytes

    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bitsandbytes.nn.Linear4bit)
    assert sum(quantization.parameter_count(p) for n, p in model.named_parameters() if "lora_" not in n) == count
    engine = TorchEngine(model, trainer_node(optimizer="adamw_8bit", lr=0.01, warmup_steps=0, lr_schedule="constant"))
    assert isinstance(engine.optimizer, bitsandbytes.optim.AdamW8bit)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.arange(20).reshape(2, 10)
    model(input_ids=ids, labels=ids).loss.backward()
    engine.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    # B moves first (A's gradient is 0 while B is 0); on the CPU bitsandbytes repacks a 4-bit weight's bytes in its
    # first forward (a layout, not an update: those weights are frozen and outside the optimizer)
    assert changed and all("lora_B" in n or "base_layer" in n for n in changed), changed
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
