"""One GPU check of prefopt, as one markdown table: exactness on CUDA, collectives on NCCL, the training paths
(torch engine, DeepSpeed) and a ~1B-shape bf16 throughput table. Run it through scripts/gpu_check.sh.

README's GPU section says no GPU figure exists until this is run on one: these are those figures.

    python scripts/gpu_check.py               # on a machine with one CUDA GPU (H100/H200): under 8 minutes
    python scripts/gpu_check.py --cpu-smoke   # every part on the CPU, tiny shapes, gloo: tests the plumbing only

Each part runs in its own process (`--part NAME`) under its own timeout, so a hang or a crash records FAIL
with its last error line and the next part runs. A check whose optional library (deepspeed, hydra-core, trl)
does not import is SKIP, not FAIL. Exit status 1 when any check failed, else 0. The table goes to stdout,
and to $OUT/gpu_check.md when $OUT is set (and to --out FILE).

Exactness reuses the tests' own models, batches and tolerances (tests/test_attention.py, tests/test_packing.py,
tests/test_logps_models.py, tests/test_precision.py) on the chosen device, without changing the tests.
Throughput reuses BatchLayout, sequence_logps and bench_step.dpo_loss (preference_loss): the trainer's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW_PREFIX = "GPUCHECK-ROW "
TOTAL_BUDGET_S = 450  # all parts together, under the 8 minutes the device machine allows (start-up on top)
SMOKE_BUDGET_S = 1200  # --cpu-smoke on a small CPU machine: not a device run, no 8-minute limit

# part -> (timeout on a GPU, timeout in --cpu-smoke); each part's timeout is also cut to what is left of the budget
PART_TIMEOUTS = {
    "environment": (30, 60),
    "exactness": (100, 240),
    "bf16": (60, 240),
    "collectives": (30, 60),
    "train_torch": (45, 120),
    "train_deepspeed": (90, 240),
    "throughput": (150, 120),
}


def emit(part: str, check: str, status: str, figures: str = "") -> None:
    """One row of the table, printed by a part's process for the parent to collect."""
    print(ROW_PREFIX + json.dumps(dict(part=part, check=check, status=status, figures=figures)), flush=True)


def last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "(no output)")[:240]


def run_check(part: str, check: str, function) -> None:
    """function() -> figures (str); an exception is FAIL with its last line, a missing optional module SKIP."""
    try:
        emit(part, check, "PASS", function())
    except ModuleNotFoundError as error:
        emit(part, check, "SKIP", f"{error.name} not importable")
    except Exception as error:  # noqa: BLE001 - a check's failure is a row, not the end of the run
        traceback.print_exc()
        emit(part, check, "FAIL", last_error_line(f"{type(error).__name__}: {error}"))


def device_name(smoke: bool) -> str:
    return "cpu" if smoke else "cuda"


# ---------------------------------------------------------------------------------------------------- comparisons


def worst_over_tolerance(pairs, rtol: float, atol: float) -> tuple[float, float]:
    """(largest |a - b|, largest |a - b| / (atol + rtol |b|)) over tensor pairs: torch.testing.assert_close's
    criterion, as figures (the check passes when the second is <= 1). Shapes must match."""
    import torch

    largest, worst = 0.0, 0.0
    for a, b in pairs:
        if a is None or b is None:
            continue
        assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.numel() == 0:
            continue
        difference = (a - b).abs()
        assert torch.isfinite(difference).all(), "non-finite values"
        largest = max(largest, float(difference.max()))
        worst = max(worst, float((difference / (atol + rtol * b.abs())).max()))
    return largest, worst


def judged(label: str, pairs, rtol: float, atol: float) -> str:
    largest, worst = worst_over_tolerance(pairs, rtol, atol)
    figure = f"{label} max|Δ| {largest:.1e} ({worst:.2f} of tol)"
    assert worst <= 1.0, f"{figure}: over rtol={rtol}, atol={atol}"
    return figure


# ---------------------------------------------------------------------------------------------------- parts


def part_environment(smoke: bool) -> None:
    import torch
    import transformers

    def versions() -> str:
        found = [
            f"python {sys.version.split()[0]}",
            f"torch {torch.__version__}",
            f"transformers {transformers.__version__}",
        ]
        for module in ("deepspeed", "hydra", "omegaconf", "datasets", "wandb", "pytest", "trl"):
            try:
                found.append(f"{module} {getattr(__import__(module), '__version__', '?')}")
            except Exception:  # noqa: BLE001 - any import failure means "absent" here
                found.append(f"{module} absent")
        return ", ".join(found)

    def device() -> str:
        if smoke:
            return f"CPU smoke mode ({os.cpu_count()} cores): no GPU figure below is a GPU figure"
        assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
        properties = torch.cuda.get_device_properties(0)
        return (
            f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
            f"{torch.cuda.device_count()} visible, bf16 {torch.cuda.is_bf16_supported()}"
        )

    run_check("environment", "libraries", versions)
    run_check("environment", "device", device)


def part_exactness(smoke: bool) -> None:
    """The CPU tests' comparisons, on the device, with the same models, batches and tolerances."""
    import torch

    from prefopt.core.errors import ConfigError
    from prefopt.data.layout import PADDED, BatchLayout, build_batch
    from prefopt.model.logps import check_logits_path, check_packed_path, response_token_logps, sequence_logps
    from tests import test_attention, test_logps_models, test_packing

    device = torch.device(device_name(smoke))
    vocab = test_logps_models.VOCAB
    stats = ("logps", "mask", "max_logps", "entropy")

    def attention_case(kind: str) -> str:
        figures = []
        for row_tokens in (None, 24):
            model = test_attention.windowed_model(kind).to(device)
            groups = test_packing.groups_of(test_attention.LENGTHS, seed=4)
            pieces_batch = BatchLayout("packed", row_tokens, "pieces").build(groups, 0).to(device)
            packed, packed_grads = test_attention.logps_and_grads(model, pieces_batch)
            padded, padded_grads = test_attention.logps_and_grads(model, PADDED.build(groups, 0).to(device))
            figures.append(judged("value", [(getattr(packed, n), getattr(padded, n)) for n in stats], 1e-5, 1e-5))
            figures.append(judged("grad", zip(packed_grads, padded_grads), 1e-4, 1e-4))
            difference = check_packed_path(model, vocab, device, BatchLayout("packed", None, "pieces"))
            assert difference < 1e-4, f"check_packed_path {difference:.1e}"
        return "; ".join(figures[:2]) + f" (one-row); {'; '.join(figures[2:])} (several rows)"

    def packing_case(kind: str) -> str:
        figures = []
        for attention in ("pieces", "dense"):
            model = test_logps_models.tiny_model(kind).to(device)
            groups = test_packing.groups_of([(6, [4, 5]), (3, [2, 6]), (8, [3, 1])], seed=3)
            layout = BatchLayout("packed", 24, attention)
            packed = sequence_logps(model, layout.build(groups, 0).to(device), chunk_size=4, with_stats=True)
            padded_batch = build_batch(groups, 0, "padded").to(device)
            padded = sequence_logps(model, padded_batch, chunk_size=4, with_stats=True)
            value = judged("value", [(getattr(packed, n), getattr(padded, n)) for n in stats], 1e-5, 1e-5)
            weights = [p for p in model.parameters() if p.requires_grad]
            packed_grads = torch.autograd.grad(packed.summed.sum(), weights, allow_unused=True)
            padded_grads = torch.autograd.grad(padded.summed.sum(), weights, allow_unused=True)
            grad = judged("grad", zip(packed_grads, padded_grads), 1e-4, 1e-5)
            figures.append(f"{attention}: {value}, {grad}")
            if attention == "dense" and kind == "gemma2":
                try:
                    check_packed_path(model, vocab, device, layout)
                except ConfigError:
                    continue
                raise AssertionError("dense packing was not refused for gemma2 (sliding window)")
            difference = check_packed_path(model, vocab, device, layout)
            assert difference < 1e-4, f"check_packed_path {difference:.1e}"
        return "; ".join(figures)

    def logps_case(kind: str) -> str:
        figures = []
        for keep_logps_mb in (0.0, 1024.0):
            model = test_logps_models.tiny_model(kind).to(device)
            input_ids, attention_mask, labels = (t.to(device) for t in test_logps_models.batch())
            ours = response_token_logps(
                model, input_ids, attention_mask, labels, chunk_size=4, keep_logps_mb=keep_logps_mb
            ).summed
            our_grads = torch.autograd.grad(ours.sum(), list(model.parameters()), allow_unused=True)
            expected = test_logps_models.direct_logps(model, input_ids, attention_mask, labels)
            expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()), allow_unused=True)
            value = judged("value", [(ours, expected)], 1e-5, 1e-5)
            grad = judged("grad", [(o, e) for o, e in zip(our_grads, expected_grads) if e is not None], 1e-4, 1e-5)
            figures.append(f"{'kept' if keep_logps_mb else 'recomputed'}: {value}, {grad}")
            difference = check_logits_path(model, vocab, device)
            assert difference < 1e-5, f"check_logits_path {difference:.1e}"
        return "; ".join(figures)

    for kind in test_attention.KINDS:
        run_check("exactness", f"test_attention: pieces == padded, {kind}", lambda: attention_case(kind))
    for kind in test_logps_models.ARCHITECTURES:
        run_check("exactness", f"test_packing -k equals_padded: {kind}", lambda: packing_case(kind))
    for kind in test_logps_models.ARCHITECTURES:
        run_check("exactness", f"test_logps_models: model's own logits, {kind}", lambda: logps_case(kind))


def part_bf16(smoke: bool) -> None:
    """tests/test_precision.py's two bf16 runs through `prefopt train`, on hardware=gpu (cpu in smoke)."""
    from tests import test_precision
    from tests.helpers import run_train

    hardware = "hardware=cpu" if smoke else "hardware=gpu"
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_bf16_"))

    def tracks_fp32() -> str:
        common = [*test_precision.TINY, hardware, "trainer.lr=1e-3", "trainer.max_steps=10", "trainer.save_final=false"]
        fp32 = test_precision.losses(run_train(workdir / "fp32", *common, "model.dtype=fp32"))
        bf16 = test_precision.losses(run_train(workdir / "bf16", *common, "model.dtype=bf16"))
        differences = [abs(a - b) for a, b in zip(fp32, bf16)]
        tolerance = test_precision.BF16_LOSS_TOLERANCE
        figures = (
            f"max |bf16 - fp32| loss {max(differences):.1e} (tol {tolerance}); fp32 moved {fp32[-1] - fp32[0]:+.3f}"
        )
        assert len(differences) == 10 and max(differences) < tolerance, figures
        assert max(differences) > 0, "bf16 and fp32 bit-identical: autocast did not run"
        assert abs(fp32[-1] - fp32[0]) > 10 * tolerance, figures
        return figures

    def small_step() -> str:
        run_dir = run_train(workdir / "lr3e-6", *test_precision.TINY, hardware, "model.dtype=bf16", "trainer.lr=3e-6")
        test_precision.assert_one_small_step_changes_every_tensor(run_dir)
        return "fp32 master weights: every tensor moved, RMSNorm weights by < 2^-9"

    run_check("bf16", f"bf16 losses track fp32, 10 steps ({hardware})", tracks_fp32)
    run_check("bf16", f"one bf16 step at lr 3e-6 changes every weight ({hardware})", small_step)


def part_collectives(smoke: bool) -> None:
    """A one-rank process group on the device's backend: the collectives prefopt relies on give exact numbers."""
    import torch
    import torch.distributed as dist

    backend = "gloo" if smoke else "nccl"
    device = torch.device(device_name(smoke))

    def collectives() -> str:
        store = Path(tempfile.mkdtemp(prefix="gpu_check_pg_")) / "store"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
        try:
            values = torch.arange(1024, dtype=torch.float32, device=device)
            summed = values.clone()
            dist.all_reduce(summed)
            assert torch.equal(summed, values), "all_reduce changed the values"
            gathered = [torch.empty_like(values)]
            dist.all_gather(gathered, values)
            assert torch.equal(gathered[0], values), "all_gather"
            objects = [None]
            dist.all_gather_object(objects, {"loss": 0.5})
            assert objects == [{"loss": 0.5}], "all_gather_object"
            broadcast = values.clone()
            dist.broadcast(broadcast, src=0)
            dist.barrier()
            done = ["all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier"]
            if not smoke:  # bf16 all_reduce: what DeepSpeed's bf16 gradients go through
                half = values.to(torch.bfloat16)
                dist.all_reduce(half)
                assert torch.equal(half, values.to(torch.bfloat16)), "bf16 all_reduce"
                done.append("bf16 all_reduce")
            version = ""
            if backend == "nccl":
                version = ", NCCL " + ".".join(str(v) for v in torch.cuda.nccl.version())
            return f"{backend}, world 1{version}: " + ", ".join(done)
        finally:
            dist.destroy_process_group()

    run_check("collectives", f"torch.distributed {backend} (world size 1)", collectives)


TRAIN_OVERRIDES = [
    "model=tiny_llama",
    "trainer.max_steps=3",
    "trainer.micro_batch_size=2",
    "trainer.eval_batch_size=4",
    "trainer.warmup_steps=0",
    "trainer.lr=1e-3",
    "dataset.arith.num_train=16",
    "dataset.arith.num_eval=4",
    "trainer.greedy_eval_examples=0",
    "dynamics.enabled=false",
    "logger.wandb.mode=disabled",
    "logger.console=plain",
]


def train_run(label: str, hardware: list[str], timeout_s: float) -> str:
    """`python -m prefopt.cli train ...` in a child process; figures from its metrics.jsonl."""
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_check_train_")) / "run"
    command = [sys.executable, "-m", "prefopt.cli", "train", *TRAIN_OVERRIDES, *hardware, f"hydra.run.dir={run_dir}"]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout_s)
    wall = time.monotonic() - started
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-8000:])
        raise RuntimeError(f"exit {result.returncode}: {last_error_line(result.stderr or result.stdout)}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 3, f"{len(losses)} train losses logged, expected 3"
    import yaml

    ran = yaml.safe_load((run_dir / "config.yaml").read_text())
    hardware_cfg, model_cfg = ran["hardware"], ran["model"]
    engine = f"engine {hardware_cfg['engine']}" + (
        f" ZeRO-{hardware_cfg['zero_stage']}" if hardware_cfg["engine"] == "deepspeed" else ""
    )
    return (
        f"{label}: {engine}, {hardware_cfg['device']}, {model_cfg['dtype']}, {hardware_cfg['gpus_per_node']} rank(s): "
        f"3 steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, wall {wall:.0f} s (start-up included)"
    )


def part_train_torch(smoke: bool) -> None:
    import hydra  # noqa: F401 - the CLI's own dependency: SKIP, not FAIL, when absent

    hardware = ["hardware=cpu"] if smoke else ["hardware=gpu"]
    run_check("train", f"prefopt train {hardware[0]} (torch engine)", lambda: train_run("torch", hardware, 100))


def part_train_deepspeed(smoke: bool) -> None:
    import deepspeed  # noqa: F401 - SKIP when absent
    import hydra  # noqa: F401

    # zero3: the stage big models use (and the ZeRO-3 reference); in smoke the CPU preset, one rank, gloo
    overrides = (
        ["hardware=cpu_2proc", "hardware.gpus_per_node=1", "hardware.zero_stage=3"] if smoke else ["hardware=zero3"]
    ) + ["model.dtype=bf16"]  # DeepSpeed's own bf16 path (weights cast by the engine), as big runs use it
    label = " ".join(overrides)
    run_check("train", f"prefopt train {label} (DeepSpeed, torchrun)", lambda: train_run("deepspeed", overrides, 200))


# ~1B Llama (no download possible: random init); HH-like lengths drawn per pair, seeded
BILLION_SHAPE = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=8192,
    vocab_size=32000,
    max_position_embeddings=1024,
)
SMOKE_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=1000,
    max_position_embeddings=256,
)


def random_pairs(count: int, vocab: int, prompt_range, response_range, seed: int):
    """Groups of (prompt, [(i, chosen), (count + i, rejected)]) with lengths drawn per pair, like pair_groups."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        return torch.randint(0, vocab, (length,), generator=generator).tolist()

    groups = []
    for index in range(count):
        prompt = draw(*prompt_range)
        groups.append((prompt, [(index, draw(*response_range)), (count + index, draw(*response_range))]))
    return groups


def part_throughput(smoke: bool) -> None:
    import torch
    import transformers
    from bench_step import dpo_loss  # scripts/bench_step.py: the benchmark's own DPO step loss

    from prefopt.data.layout import PADDED, BatchLayout
    from prefopt.model.logps import sequence_logps, split_pairs
    from prefopt.model.precision import set_compute_dtype

    device = torch.device(device_name(smoke))
    shape = SMOKE_SHAPE if smoke else BILLION_SHAPE
    pairs, steps = (2, 1) if smoke else (8, 4)
    prompt_range, response_range = ((4, 24), (2, 24)) if smoke else ((32, 192), (16, 192))
    config = transformers.LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # built on the device: a CPU init of 1B weights would take most of the budget
        model = transformers.LlamaForCausalLM(config)
    model.train()
    set_compute_dtype(model, "bf16", "torch")  # fp32 master weights, bf16 autocast: model.dtype=bf16 on hardware=gpu
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    steps_groups = [random_pairs(pairs, shape["vocab_size"], prompt_range, response_range, seed) for seed in range(4)]
    useful = [sum(len(p) + sum(len(r) for _, r in rs) for p, rs in groups) for groups in steps_groups]

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_step(layout, groups, reference) -> int:
        batch = layout.build(groups, 0).to(device)
        loss = dpo_loss(sequence_logps(model, batch, chunk_size=256, keep_logps_mb=1024), reference)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert torch.isfinite(loss), f"loss {float(loss)}"
        return int(batch.input_ids.numel())

    def measure(layout) -> str:
        # reference.precompute=auto: the reference log-probs come from one pass before training, not each step
        with torch.no_grad():
            references = [
                split_pairs(sequence_logps(model, layout.build(groups, 0).to(device), chunk_size=256).summed)
                for groups in steps_groups
            ]
        one_step(layout, steps_groups[0], references[0])  # warm-up: kernels, allocator, optimizer state
        synchronize()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started, row_tokens = time.perf_counter(), 0
        for step in range(steps):
            index = step % len(steps_groups)
            row_tokens += one_step(layout, steps_groups[index], references[index])
        synchronize()
        seconds = (time.perf_counter() - started) / steps
        tokens = sum(useful[step % len(steps_groups)] for step in range(steps)) / steps
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        return (
            f"{tokens / seconds:,.0f} useful tokens/s ({tokens:.0f} per step, {row_tokens / steps:.0f} row tokens "
            f"incl. padding/prompt copies), {seconds * 1000:.0f} ms/step{peak}"
        )

    what = (
        f"{parameters / 1e9:.2f}B params, bf16 autocast + fp32 AdamW, {pairs} pairs/step, {steps} timed steps, "
        f"random ids (prompt {prompt_range[0]}-{prompt_range[1]}, responses {response_range[0]}-{response_range[1]})"
    )
    emit("throughput", "setup", "INFO", what)
    layouts = [
        ("padded", PADDED),
        ('dense packed BatchLayout("packed",1024,"dense")', BatchLayout("packed", 1024, "dense")),
        ('pieces BatchLayout("packed",None,"pieces")', BatchLayout("packed", None, "pieces")),
    ]
    for label, layout in layouts:
        run_check("throughput", label, lambda: measure(layout))
    try:
        import trl

        emit(
            "throughput", "TRL", "SKIP", f"trl {trl.__version__} importable; TRL rows are scripts/benchmark.py --vs-trl"
        )
    except ImportError:
        emit("throughput", "TRL", "SKIP", "TRL not installed")


PARTS = {
    "environment": part_environment,
    "exactness": part_exactness,
    "bf16": part_bf16,
    "collectives": part_collectives,
    "train_torch": part_train_torch,
    "train_deepspeed": part_train_deepspeed,
    "throughput": part_throughput,
}


# ---------------------------------------------------------------------------------------------------- the parent


def run_part(name: str, smoke: bool, timeout_s: float) -> list[dict]:
    """The part in its own process group (torchrun's workers included), killed whole at its timeout."""
    command = [sys.executable, str(Path(__file__).resolve()), "--part", name] + (["--cpu-smoke"] if smoke else [])
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if smoke:
        environment["CUDA_VISIBLE_DEVICES"] = ""
    environment.setdefault("WANDB_MODE", "disabled")
    process = subprocess.Popen(
        command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    started = time.monotonic()
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        timed_out = True
    rows = [json.loads(line[len(ROW_PREFIX) :]) for line in stdout.splitlines() if line.startswith(ROW_PREFIX)]
    wall = time.monotonic() - started
    if timed_out:
        tail = last_error_line(stderr) if stderr.strip() else "no error output"
        rows.append(dict(part=name, check="(part)", status="FAIL", figures=f"timed out after {wall:.0f} s; {tail}"))
    elif process.returncode != 0:
        rows.append(
            dict(
                part=name,
                check="(part)",
                status="FAIL",
                figures=f"exit {process.returncode}: {last_error_line(stderr)}",
            )
        )
    for row in rows:
        row["wall"] = f"{wall:.0f} s"
    log = Path(tempfile.gettempdir()) / f"gpu_check_{name}.log"
    log.write_text(stdout + "\n--- stderr ---\n" + stderr)
    return rows


def table(rows: list[dict], smoke: bool, wall: float) -> str:
    failed = sum(row["status"] == "FAIL" for row in rows)
    mode = "CPU smoke (tiny shapes, gloo: plumbing only, no GPU figures)" if smoke else "GPU"
    lines = [
        f"## prefopt GPU check: {mode}",
        "",
        "| part | check | status | figures | part wall |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        figures = row["figures"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row['part']} | {row['check']} | {row['status']} | {figures} | {row['wall']} |")
    lines += ["", f"{len(rows)} rows, {failed} FAIL, total wall {wall:.0f} s"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every part on the CPU, tiny shapes, gloo")
    parser.add_argument("--part", choices=sorted(PARTS), help="run one part in this process (the parent's child)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run (default: all)")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke or os.environ.get("GPU_CHECK_CPU_SMOKE") == "1"
    if args.part:
        sys.path.insert(0, str(ROOT))
        PARTS[args.part](smoke)
        return 0
    started, rows = time.monotonic(), []
    for name in args.parts.split(","):
        left = (SMOKE_BUDGET_S if smoke else TOTAL_BUDGET_S) - (time.monotonic() - started)
        if left < 5:
            rows.append(dict(part=name, check="(part)", status="FAIL", figures="not run: budget spent", wall="0 s"))
            continue
        timeout_s = min(PART_TIMEOUTS[name][1 if smoke else 0], left)
        print(f"[gpu_check] {name} (timeout {timeout_s:.0f} s) ...", file=sys.stderr, flush=True)
        rows += run_part(name, smoke, timeout_s)
    text = table(rows, smoke, time.monotonic() - started)
    print(text)
    destinations = [args.out] if args.out else []
    if os.environ.get("OUT"):
        destinations.append(Path(os.environ["OUT"]) / "gpu_check.md")
    for destination in destinations:
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(text)
    return 1 if any(row["status"] == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
