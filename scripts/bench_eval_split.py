"""Wall time of the held-out passes (eval pairs, probes, greedy answers) on one rank vs split over two
gloo ranks (prefopt/train/sharding.py), one thread per rank, the same model and data in both.

    .venv/bin/python scripts/bench_eval_split.py                          # tiny_llama, 64 eval pairs, 32 probes
    .venv/bin/python scripts/bench_eval_split.py --model smollm2_135m --eval 16 --probes 8

The loss is simpo (reference-free): with the default precomputed reference an eval pass is policy forwards
only, as here. Prints the median of --repeat timings per pass. Nothing is asserted: numbers go in notes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed_passes(rank: int, world_size: int, args: argparse.Namespace, init_file: str, out: str) -> None:
    import torch.distributed
    from hydra import compose, initialize_config_module

    from prefopt.core.distributed import DistInfo
    from prefopt.data import build_preference_data
    from prefopt.data.layout import BatchLayout
    from prefopt.model.loading import load_model, load_tokenizer, resolve_model_source
    from prefopt.run.config import register_schema
    from prefopt.train.dynamics import build_probe_set, evaluate_probes
    from prefopt.train.evaluation import evaluate, greedy_accuracy
    from prefopt.train.step import PreferenceStep

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    dist = DistInfo(rank, rank, world_size, initialized=True)
    register_schema()
    with initialize_config_module(config_module="prefopt.conf", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                f"model={args.model}",
                "loss=simpo",
                "hardware=cpu",
                f"dataset.arith.num_eval={args.eval}",
                "dataset.arith.num_train=64",
            ],
        )
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    data = build_preference_data(cfg.dataset, tokenizer, 0)
    policy = load_model(cfg.model, source, len(tokenizer), 0)
    step_fn = PreferenceStep(cfg, policy, None, torch.device("cpu"), tokenizer.pad_token_id)
    probes = build_probe_set(data, args.probes, 0, len(tokenizer), set(tokenizer.all_special_ids))
    trainer = cfg.trainer
    passes = {
        "eval": lambda: evaluate(step_fn, data.eval, trainer.eval_batch_size, None, 0, dist),
        "probes": lambda: evaluate_probes(
            policy,
            probes,
            trainer.logp_chunk_size,
            "cpu",
            cfg.dynamics.batch_size,
            BatchLayout.from_trainer(trainer),
            dist,
        ),
        "greedy": lambda: greedy_accuracy(
            policy, tokenizer, data.eval[: args.greedy], trainer.max_new_tokens, "cpu", dist
        ),
    }
    timings = {name: [] for name in passes}
    for _ in range(args.repeat):
        for name, run in passes.items():
            dist.barrier()
            started = time.perf_counter()
            run()
            dist.barrier()
            timings[name].append(time.perf_counter() - started)
    if rank == 0:
        Path(out).write_text(json.dumps({name: statistics.median(values) for name, values in timings.items()}))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_llama", help="model preset (conf/model/)")
    parser.add_argument("--eval", type=int, default=64, help="held-out pairs scored by the eval pass")
    parser.add_argument("--probes", type=int, default=32, help="probe prompts (six responses each)")
    parser.add_argument("--greedy", type=int, default=16, help="prompts answered greedily")
    parser.add_argument("--repeat", type=int, default=3, help="timings per pass (the median is shown)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for world_size in (1, 2):
            out = Path(scratch) / f"world{world_size}.json"
            torch.multiprocessing.spawn(
                timed_passes,
                args=(world_size, args, str(Path(scratch) / f"init{world_size}"), str(out)),
                nprocs=world_size,
                join=True,
            )
            results[world_size] = json.loads(out.read_text())
    print(f"{'pass':<8} {'1 rank (s)':>11} {'2 ranks (s)':>12} {'speed-up':>9}")
    for name in results[1]:
        one, two = results[1][name], results[2][name]
        print(f"{name:<8} {one:>11.3f} {two:>12.3f} {one / two:>8.2f}x")
    total_one, total_two = sum(results[1].values()), sum(results[2].values())
    print(f"{'total':<8} {total_one:>11.3f} {total_two:>12.3f} {total_one / total_two:>8.2f}x")


if __name__ == "__main__":
    main()
