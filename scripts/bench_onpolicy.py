"""What on-policy arith sampling (dataset.arith.rejected_style=onpolicy) costs and yields on this machine: for each
setting, the seconds to sample the questions, the usable share of the samples, and how many questions give a pair.
Run it alone on the machine (nothing else on the cores): it times.

    .venv/bin/python scripts/bench_onpolicy.py [--questions 32] [--model smollm2_135m] [--settings 1.0:32,0.7:32]
"""

from __future__ import annotations

import argparse
import time

from prefopt.core.distributed import DistInfo
from prefopt.data.arith import generate_arith_rows
from prefopt.model.loading import load_tokenizer, resolve_model_source
from prefopt.run.data_preview import compose_run_config
from prefopt.train.onpolicy import OnPolicySampler, draw_samples, load_sampling_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=32, help="questions sampled per setting")
    parser.add_argument("--model", default="smollm2_135m", help="model preset")
    parser.add_argument(
        "--settings", default="1.0:32,0.7:32,1.0:64", help="temperature:max_new_tokens, comma-separated"
    )
    args = parser.parse_args()
    print("| temperature | max_new_tokens | questions x samples | s | s/question | usable | questions with a pair |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings.split(","):
        temperature, max_new_tokens = setting.split(":")
        cfg = compose_run_config(
            [
                f"model={args.model}",
                "hardware=cpu",
                "dataset.arith.rejected_style=onpolicy",
                f"dataset.arith.num_eval={args.questions // 4}",
                f"dataset.arith.num_train={args.questions - args.questions // 4}",
                f"dataset.arith.onpolicy.temperature={temperature}",
                f"dataset.arith.onpolicy.max_new_tokens={max_new_tokens}",
            ]
        )
        source = resolve_model_source(cfg.model)
        tokenizer = load_tokenizer(cfg.model, source)
        model = load_sampling_model(cfg, source, tokenizer, "cpu")
        sampler = OnPolicySampler(cfg.model, cfg.dataset, cfg.trainer.seed, source, tokenizer)
        started = time.perf_counter()
        samples = draw_samples(model, tokenizer, sampler, cfg.trainer.seed, DistInfo(), "cpu")
        seconds = time.perf_counter() - started
        train, held_out, _ = generate_arith_rows(cfg.dataset.arith, cfg.trainer.seed, samples)
        drawn = len(samples) * cfg.dataset.arith.onpolicy.samples
        usable = sum(map(len, samples))
        print(
            f"| {temperature} | {max_new_tokens} | {len(samples)} x {cfg.dataset.arith.onpolicy.samples} | "
            f"{seconds:.0f} | {seconds / len(samples):.2f} | {usable}/{drawn} ({usable / drawn:.0%}) | "
            f"{len(train) + len(held_out)}/{len(samples)} |"
        )


if __name__ == "__main__":
    main()
