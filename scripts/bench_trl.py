"""The TRL side of `scripts/benchmark.py --vs-trl`: TRL's DPOTrainer on given pairs, per-step wall times.

Runs in its own venv (.venv-bench: torch 2.13.0 CPU, trl==1.16.0, datasets, accelerate), which
benchmark.py creates; prefopt is not imported here and TRL is not imported by prefopt.

    .venv-bench/bin/python scripts/bench_trl.py --model DIR --pairs ordered.jsonl --steps 12 --out trl.json \
        [--precompute] [--no-gradient-checkpointing]

The pairs are {prompt, chosen, rejected} plain strings (TRL's standard, non-conversational format: no
chat template; TRL appends eos_token to each response). They are fed in file order
(train_sampling_strategy="sequential"), so benchmark.py can give TRL the exact batches prefopt draws.
Everything else is DPOConfig's default (beta 0.1, sigmoid loss, lr 1e-6, linear schedule, no warmup,
max_length 1024, AdamW, max_grad_norm 1.0), on the CPU in fp32, 4 pairs per step, no eval, no saving.
That default includes gradient checkpointing: TRL 1.x's _BaseConfig (trl/trainer/base_config.py, which DPOConfig
subclasses) sets `gradient_checkpointing: bool = field(default=True, ...)` where TrainingArguments has False;
--no-gradient-checkpointing passes gradient_checkpointing=False (the activations fit easily at 4 pairs per step).

Step times come from a TrainerCallback: time.perf_counter() at each on_step_begin / on_step_end, and the
process's CPU time (time.process_time()) at each on_step_end.
The precompute_ref_log_probs pass (TRL runs it in DPOTrainer.__init__) is timed on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an HF model directory (prefopt's converted SmolLM2)")
    parser.add_argument("--pairs", required=True, help="JSONL of {prompt, chosen, rejected}, in training order")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step (per_device_train_batch_size)")
    parser.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
    parser.add_argument(
        "--no-gradient-checkpointing",
        action="store_true",
        help="gradient_checkpointing=False (DPOConfig's default is True)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="where the JSON result goes")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the log (the callback prints progress)

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    with open(args.pairs, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    dataset = Dataset.from_list([{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows])

    timings = {"begin": [], "end": [], "cpu_end": [], "log": []}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kwargs):
            timings["train_begin"] = time.perf_counter()

        def on_step_begin(self, args_, state, control, **kwargs):
            timings["begin"].append(time.perf_counter())

        def on_step_end(self, args_, state, control, **kwargs):
            now = time.perf_counter()
            timings["end"].append(now)
            timings["cpu_end"].append(time.process_time())  # user + system CPU seconds of this process, all threads
            previous = timings["end"][-2] if len(timings["end"]) > 1 else timings["begin"][0]
            print(f"[bench_trl] step {state.global_step}/{state.max_steps} {now - previous:.2f} s", flush=True)

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                timings["log"].append(
                    {"step": state.global_step, **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}}
                )

    class TimedDPOTrainer(DPOTrainer):
        """DPOTrainer with its one-off reference pass timed (nothing else changed)."""

        def _precompute_ref_logps(self, dataset, name, batch_size):
            started = time.perf_counter()
            result = super()._precompute_ref_logps(dataset, name, batch_size)
            timings.setdefault("precompute_s", 0.0)
            timings["precompute_s"] += time.perf_counter() - started
            print(
                f"[bench_trl] precompute_ref_log_probs ({name}, {len(dataset)} pairs): {timings['precompute_s']:.1f} s",
                flush=True,
            )
            return result

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    output_dir = tempfile.mkdtemp(prefix="bench-trl-")
    config = DPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        num_train_epochs=1,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        train_sampling_strategy="sequential",  # file order: the batches prefopt draws, in its order
        dataloader_num_workers=0,
        precompute_ref_log_probs=args.precompute,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        bf16=False,
        fp16=False,
        seed=args.seed,
        disable_tqdm=True,
    )
    built = time.perf_counter()
    trainer = TimedDPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()]
    )
    init_s = time.perf_counter() - built
    # what TRL will train on, per pair: prompt + chosen + rejected token ids (after its tokenization and EOS)
    train = trainer.train_dataset
    token_counts = [
        len(p) + len(c) + len(r) for p, c, r in zip(train["prompt_ids"], train["chosen_ids"], train["rejected_ids"])
    ]
    print(
        f"[bench_trl] trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {len(train)} pairs, {sum(token_counts)} tokens; "
        f"reference model in memory: {trainer.ref_model is not None}; gradient checkpointing: "
        f"{config.gradient_checkpointing}; init {init_s:.1f} s",
        flush=True,
    )
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    begin, end = timings["begin"], timings["end"]
    result = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "precompute": args.precompute,
        "gradient_checkpointing": config.gradient_checkpointing,
        "precompute_s": timings.get("precompute_s"),
        "init_s": init_s,
        "train_s": train_s,
        "steps": len(end),
        # step k: on_step_end(k-1) -> on_step_end(k) (batch fetch + collation + forward/backward + optimizer + the
        # previous step's logging); step 1: on_step_begin(1) -> on_step_end(1)
        "step_s": [end[0] - begin[0]] + [b - a for a, b in zip(end, end[1:])],
        "step_compute_s": [b - a for a, b in zip(begin, end)],  # on_step_begin -> on_step_end only
        "cpu_at_step_end": timings["cpu_end"],
        "pair_tokens": token_counts,
        "ref_model_in_memory": trainer.ref_model is not None,
        "logs": timings["log"],
        "config": {
            key: getattr(config, key)
            for key in (
                "beta",
                "loss_type",
                "learning_rate",
                "lr_scheduler_type",
                "warmup_steps",
                "max_length",
                "max_grad_norm",
                "optim",
                "padding_free",
                "pad_to_multiple_of",
                "gradient_checkpointing",
                "gradient_checkpointing_kwargs",
            )
        },
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle, default=str)
    print(f"[bench_trl] done: {len(end)} steps in {train_s:.1f} s -> {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
