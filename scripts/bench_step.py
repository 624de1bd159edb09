"""One DPO training step per batch layout, in process, against an SFT step on the same tokens, and where its time goes
(attention, matmuls, optimizer, element-wise).

    .venv/bin/python scripts/bench_step.py                              # SmolLM2-135M, 6 steps, 4 layouts + SFT
    .venv/bin/python scripts/bench_step.py --tiny --steps 2             # the machinery in seconds (tiny Llama)
    .venv/bin/python scripts/bench_step.py --layouts pieces,dense-auto --row-budgets --threads 8 --out DIR

Layouts (--layouts, a comma list): padded (one row per sequence), dense-N (packed rows of at most N tokens, a dense
4-D mask per row; dense-auto: the longest segment, data/layout.py row_budget) and pieces (packed in one row,
attended piece by piece: the default; pieces-N: rows of at most N tokens). Every layout starts from the same weights
and trains on the same 4 HH-like pairs per step in the same order (scripts/make_hh_like_pairs.py, --pairs-seed),
fp32. A step: build the batch, sequence_logps (trainer.logp_chunk_size / logp_keep_mb of the config: 256, 1024 MB),
the sigmoid DPO loss against reference log-probs computed once before timing (no grad, same layout), backward, AdamW
(lr 3e-6), zero_grad. Step 1 is warm-up; the tables show the median of the others, tokens/s of unique tokens (prompt
+ chosen + rejected, eos included), and each layout's largest loss difference from padded (same numbers: ~1e-5 or
less).

SFT (--vs-sft, on by default): the same tokens, one packed row per step holding (prompt + chosen) and (rejected) of
each pair as separate sequences, position ids restarting at each, each sequence one causal piece of attention by
pieces (as lean as the DPO step's attention: the limit is the same work, not a handicapped SFT), HF's causal LM loss
over every position (the full head, labels -100 at each sequence start), as an SFT trainer runs it. A check on the
first batch: the packed loss equals the loss of the sequences run one by one (and differs when they may attend
across).

Time split: one more step per layout under torch.profiler (CPU), the self CPU time of aten ops by category
(categorize()); the rest of the profiled wall time is Python, dispatch and profiler overhead. MFU = 6 N tokens/s /
peak, peak = a 2048^2 fp32 matmul, best of 8 (scripts/benchmark.py): 6 N, not 8 N, since the reference is
precomputed and the step runs no reference forward. --row-budgets adds dense-256/512/1024/2048/auto and
pieces-512/1024/one row (s/step): the figures behind the default budgets (row_budget). Tables print and go to
OUT/bench_step.md, numbers to OUT/bench_step.json. Nothing is asserted."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import matmul_peak_gflops  # noqa: E402
from make_hh_like_pairs import make_pairs  # noqa: E402

from prefopt.data.layout import AttentionPieces, BatchLayout, pair_groups  # noqa: E402
from prefopt.losses import preference_loss  # noqa: E402
from prefopt.model.attention import pieces_attention  # noqa: E402
from prefopt.model.logps import sequence_logps, split_pairs  # noqa: E402

PAIRS_PER_STEP = 4
LR = 3e-6
DEFAULT_LAYOUTS = "padded,dense-1024,dense-auto,pieces"
ROW_BUDGETS = (
    "dense-256",
    "dense-512",
    "dense-1024",
    "dense-2048",
    "dense-auto",
    "pieces-512",
    "pieces-1024",
    "pieces",
)
CATEGORIES = ("attention", "matmul", "optimizer", "element-wise")
# own-name rules, matched on the lower-cased name without underscores (aten ops and autograd nodes alike)
ATTENTION_NAMES = ("scaleddotproduct", "flashattention", "efficientattention", "cudnnattention")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm", "aten::addbmm")
MATMUL_NODES = ("mmbackward", "matmulbackward", "linearbackward")  # also AddmmBackward0, BmmBackward0, ...


def layout_of(name: str) -> BatchLayout:
    if name == "padded":
        return BatchLayout("padded")
    if name == "pieces":
        return BatchLayout("packed", None, "pieces")
    attention, _, budget = name.partition("-")
    if attention in ("dense", "pieces") and (budget == "auto" or budget.isdigit()):
        return BatchLayout("packed", None if budget == "auto" else int(budget), attention)
    raise SystemExit(f"unknown layout {name!r}: padded | pieces | pieces-N | dense-auto | dense-N")


def load(tiny: bool):
    """(model, tokenizer, trainer config) as prefopt builds them: tiny_llama (hidden 64, 2 layers, byte tokenizer)
    or SmolLM2-135M (converted from its GGUF on first use)."""
    from hydra import compose, initialize_config_module

    from prefopt.model.loading import load_model, load_tokenizer, resolve_model_source
    from prefopt.run.config import register_schema

    register_schema()
    with initialize_config_module(config_module="prefopt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={'tiny_llama' if tiny else 'smollm2_135m'}"])
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    return load_model(cfg.model, source, len(tokenizer), 0), tokenizer, cfg.trainer


def pair_batches(tokenizer, batches: int, seed: int) -> list[list[SimpleNamespace]]:
    """HH-like pairs, tokenized as a trainer does (no special tokens, eos after each response), 4 per batch."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [tokenizer.eos_token_id]
    pairs = [
        SimpleNamespace(
            prompt_ids=encode(row["prompt"]),
            chosen_ids=encode(row["chosen"]) + eos,
            rejected_ids=encode(row["rejected"]) + eos,
        )
        for row in make_pairs(tokenizer, PAIRS_PER_STEP * batches, seed)
    ]
    return [pairs[start : start + PAIRS_PER_STEP] for start in range(0, len(pairs), PAIRS_PER_STEP)]


def unique_tokens(pairs) -> int:
    return sum(len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids) for pair in pairs)


def optimizer_step(optimizer) -> None:
    with record_function("optimizer"):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def dpo_loss(policy, reference) -> torch.Tensor:
    """The sigmoid DPO loss of a pair batch's policy TokenLogps against (chosen, rejected) reference log-probs."""
    (chosen, rejected), (chosen_lengths, rejected_lengths) = split_pairs(policy.summed), split_pairs(policy.lengths)
    return preference_loss(
        "dpo",
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        reference_chosen_logps=reference[0],
        reference_rejected_logps=reference[1],
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    ).loss


def dpo_step(model, optimizer, layout: BatchLayout, pairs, reference, pad_id: int, trainer):
    """One training step as PreferenceStep takes it (build, policy log-probs, DPO loss), backward, AdamW; returns
    (loss, rows x width, the policy's summed log-probs per sequence)."""
    batch = layout.build(pair_groups(pairs), pad_id)
    policy = sequence_logps(model, batch, trainer.logp_chunk_size, keep_logps_mb=trainer.logp_keep_mb)
    loss = dpo_loss(policy, reference)
    loss.backward()
    optimizer_step(optimizer)
    return loss.item(), "x".join(map(str, batch.input_ids.shape)), policy.summed.detach().tolist()


def sft_row(pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids, labels) of one packed row: (prompt + chosen) and (rejected) per pair."""
    sequences = [seq for pair in pairs for seq in (pair.prompt_ids + pair.chosen_ids, pair.rejected_ids)]
    input_ids = torch.tensor([token for seq in sequences for token in seq]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(len(seq)) for seq in sequences]).unsqueeze(0)
    labels = input_ids.clone()
    labels[position_ids == 0] = -100  # a sequence's first token is not predicted from the previous sequence
    return input_ids, position_ids, labels


def sft_pieces(position_ids: torch.Tensor) -> AttentionPieces:
    """Each sequence of the SFT row one causal piece: attention as lean as the DPO step's (model/attention.py)."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    pieces = tuple((0, start, end, start, start) for start, end in zip(starts, starts[1:]))
    return AttentionPieces(pieces, rows=1, width=position_ids.shape[1])


def sft_loss(model, input_ids, position_ids, labels) -> torch.Tensor:
    """HF's causal LM loss of the SFT row, each sequence attended as one piece."""
    with pieces_attention(model):
        return model(
            input_ids=input_ids,
            position_ids=position_ids,
            labels=labels,
            use_cache=False,
            attention_pieces=sft_pieces(position_ids),
        ).loss


def sft_step(model, optimizer, pairs):
    input_ids, position_ids, labels = sft_row(pairs)
    loss = sft_loss(model, input_ids, position_ids, labels)
    loss.backward()
    optimizer_step(optimizer)
    return loss.item(), "x".join(map(str, input_ids.shape)), []


@torch.no_grad()
def sft_check(model, pairs) -> dict:
    """The packed SFT loss as sft_step computes it vs the mean token loss of its sequences run one by one (equal when
    nothing attends across sequences), and the packed loss with no pieces (attending across: must differ)."""
    input_ids, position_ids, labels = sft_row(pairs)
    packed = float(sft_loss(model, input_ids, position_ids, labels))
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [input_ids.shape[1]]
    total = 0.0
    for start, end in zip(starts, starts[1:]):
        ids = input_ids[:, start:end]
        total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * (end - start - 1)
    separate = total / int((labels[0, 1:] != -100).sum())
    across = float(model(input_ids=input_ids, labels=labels, use_cache=False).loss)
    return {"packed": packed, "separate": separate, "abs_diff": abs(packed - separate), "attending_across": across}


def own_category(name: str):
    if name == "optimizer":
        return "optimizer"
    flat = name.lower().replace("_", "")
    if any(pattern in flat for pattern in ATTENTION_NAMES):
        return "attention"
    if name in MATMUL_OPS or any(node in flat for node in MATMUL_NODES):
        return "matmul"
    return None


def categorize(event, memo: dict):
    """The category of a profiler event: the first of optimizer, attention, matmul that the event or any of its
    ancestors has by name (so the math-attention bmm/softmax under an SDPA call is attention, aten::t under
    aten::linear a matmul, every op inside record_function("optimizer") the optimizer); None = element-wise."""
    key = id(event)
    if key not in memo:
        found = [own_category(event.name)]
        if event.cpu_parent is not None:
            found.append(categorize(event.cpu_parent, memo))
        memo[key] = next((category for category in CATEGORIES[:3] if category in found), None)
    return memo[key]


def time_split(events, wall: float) -> dict:
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    memo: dict = {}
    for event in events:
        if event.name.startswith("aten::"):
            seconds[categorize(event, memo) or "element-wise"] += event.self_cpu_time_total / 1e6
    seconds["other"] = max(wall - sum(seconds.values()), 0.0)  # Python, dispatch, autograd engine, profiler
    return {"wall_s": wall, "seconds": seconds}


def profiled(step) -> dict:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        started = time.perf_counter()
        step()
        wall = time.perf_counter() - started
    return time_split(prof.events(), wall)


def timed_steps(step, batches, steps: int, with_profile: bool) -> dict:
    """step(i) runs training step i and returns (loss, rows x width, policy log-probs); steps 0..steps-1 are timed
    (the first is warm-up, left out of the medians), step `steps` runs under the profiler when asked."""
    times, outputs = [], []
    for index in range(steps):
        started = time.perf_counter()
        outputs.append(step(index))
        times.append(time.perf_counter() - started)
    tokens = [unique_tokens(pairs) for pairs in batches[:steps]]
    timed = slice(1, None) if steps > 1 else slice(None)
    losses, shapes, logps = (list(column) for column in zip(*outputs))
    return {
        "s_per_step": statistics.median(times[timed]),
        "tokens_per_s": statistics.median(n / t for n, t in zip(tokens[timed], times[timed])),
        "shapes": shapes,
        "losses": losses,
        "policy_logps": logps,
        "step_s": times,
        "split": profiled(lambda: step(steps)) if with_profile else None,
    }


def run_dpo(name, model, initial, batches, pad_id, trainer, steps, with_profile) -> dict:
    layout = layout_of(name)
    model.load_state_dict(initial)
    with torch.no_grad():
        references = [
            split_pairs(sequence_logps(model, layout.build(pair_groups(pairs), pad_id), trainer.logp_chunk_size).summed)
            for pairs in batches
        ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    step = lambda i: dpo_step(model, optimizer, layout, batches[i], references[i], pad_id, trainer)  # noqa: E731
    return timed_steps(step, batches, steps, with_profile)


def run_sft(model, initial, batches, steps) -> dict:
    model.load_state_dict(initial)
    check = sft_check(model, batches[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    return {**timed_steps(lambda i: sft_step(model, optimizer, batches[i]), batches, steps, True), "check": check}


def max_diff(mine: list, theirs: list) -> float:
    """Largest abs difference of two per-step lists (of numbers, or of lists of numbers)."""
    flat = lambda values: [v for step in values for v in (step if isinstance(step, list) else [step])]  # noqa: E731
    return max(abs(a - b) for a, b in zip(flat(mine), flat(theirs)))


def tables(results: dict, budgets: dict, params: int, peak: float) -> str:
    sft = results.get("sft")
    padded = results.get("padded")
    lines = [
        "| layout | rows x width per step | s/step | tokens/s | MFU | sft_s/dpo_s | max abs diff vs padded: loss, "
        "policy logp | losses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        diffs = ""
        if padded is not None and name not in ("padded", "sft"):
            diffs = ", ".join(f"{max_diff(result[key], padded[key]):.1e}" for key in ("losses", "policy_logps"))
        mfu = 6 * params * result["tokens_per_s"] / (peak * 1e9)
        ratio = f"{sft['s_per_step'] / result['s_per_step']:.2f}" if sft else ""
        lines.append(
            f"| {name} | {', '.join(result['shapes'])} | {result['s_per_step']:.3f} | {result['tokens_per_s']:.0f} | "
            f"{mfu:.1%} | {ratio} | {diffs} | {' '.join(f'{loss:.6f}' for loss in result['losses'])} |"
        )
    lines += [
        "",
        "MFU = 6 N tokens/s / matmul peak (6 N: the reference is precomputed, no 2 N reference forward in the step). "
        "sft_s/dpo_s: the SFT step's time over this one's on the same tokens (acceptance: >= 0.9 for pieces).",
    ]
    lines += ["", "| layout | " + " | ".join(CATEGORIES) + " | other | profiled step s |", "|---" * 7 + "|"]
    for name, result in results.items():
        seconds, wall = result["split"]["seconds"], result["split"]["wall_s"]
        cells = " | ".join(f"{seconds[key]:.3f} s ({seconds[key] / wall:.0%})" for key in (*CATEGORIES, "other"))
        lines.append(f"| {name} | {cells} | {wall:.3f} |")
    lines += [
        "",
        "Self CPU time of aten ops in one profiled step. attention: SDPA / flash / efficient attention ops and every "
        "op under them (mask building is element-wise); matmul: mm, addmm, bmm, matmul, linear and the ops of their "
        "autograd nodes; optimizer: every op under record_function('optimizer') (AdamW.step); other: the profiled "
        "wall time less all aten self time (Python, autograd engine, profiler).",
    ]
    if budgets:
        lines += ["", "| attention, row budget | rows x width per step | s/step | tokens/s |", "|---|---|---|---|"]
        for name, result in budgets.items():
            label = name if "-" in name else f"{name}, one row"
            lines.append(
                f"| {label} | {', '.join(result['shapes'])} | {result['s_per_step']:.3f} | "
                f"{result['tokens_per_s']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per layout, the first one warm-up")
    parser.add_argument("--pairs-seed", type=int, default=0, help="seed of make_hh_like_pairs")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_step"), help="where the tables and JSON go")
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="comma list: padded, pieces, dense-auto, dense-N")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama (hidden 64, 2 layers, byte tokens)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--vs-sft", action=argparse.BooleanOptionalAction, default=True, help="the SFT row")
    parser.add_argument("--row-budgets", action="store_true", help="s/step of each dense and pieces row budget")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [name.strip() for name in args.layouts.split(",") if name.strip()]
    for name in names + list(ROW_BUDGETS):
        layout_of(name)  # a bad name fails before the model loads

    model, tokenizer, trainer = load(args.tiny)
    model.train()
    initial = {key: value.detach().clone() for key, value in model.state_dict().items()}
    batches = pair_batches(tokenizer, args.steps + 1, args.pairs_seed)  # the last one for the profiled step
    params = sum(parameter.numel() for parameter in model.parameters())
    peak = matmul_peak_gflops()
    tokens = [unique_tokens(pairs) for pairs in batches[: args.steps]]
    header = (
        f"{'tiny_llama' if args.tiny else 'SmolLM2-135M'}, {params / 1e6:.2f} M parameters, fp32, "
        f"{torch.get_num_threads()} threads, matmul peak {peak:.1f} GFLOP/s; {args.steps} steps (first = warm-up) "
        f"of {PAIRS_PER_STEP} pairs, unique tokens per step {tokens}, pairs seed {args.pairs_seed}"
    )
    print(header, flush=True)

    results: dict = {}
    for name in names:
        print(f"[bench_step] {name}", flush=True)
        results[name] = run_dpo(name, model, initial, batches, tokenizer.pad_token_id, trainer, args.steps, True)
    if args.vs_sft:
        print("[bench_step] sft", flush=True)
        results["sft"] = run_sft(model, initial, batches, args.steps)
    budgets: dict = {}
    for name in ROW_BUDGETS if args.row_budgets else ():
        print(f"[bench_step] row budget {name}", flush=True)
        budgets[name] = results.get(name) or run_dpo(
            name, model, initial, batches, tokenizer.pad_token_id, trainer, args.steps, False
        )

    text = header + "\n\n" + tables(results, budgets, params, peak)
    if "sft" in results:
        check = results["sft"]["check"]
        text += (
            f"\n\nSFT packing check (batch 1, initial weights): packed loss {check['packed']:.6f}, sequences one by "
            f"one {check['separate']:.6f} (abs diff {check['abs_diff']:.1e}); attending across sequences "
            f"{check['attending_across']:.6f}"
        )
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_step.md").write_text(text + "\n")
    record = {"header": header, "params": params, "peak_gflops": peak, "layouts": results, "row_budgets": budgets}
    (args.out / "bench_step.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwritten: {args.out / 'bench_step.md'}, {args.out / 'bench_step.json'}")


if __name__ == "__main__":
    main()
