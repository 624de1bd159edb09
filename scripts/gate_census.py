"""Where would the Gate-DPO gate sit on this data before training? Prints the distribution of the gate's
probability estimates (seq: geometric-mean token probability; q10: a low token-probability quantile) over the
rejected (and, for comparison, chosen) responses of the first N training pairs, under the initial model, and the
gate values g = sigmoid(alpha * (p - tau)) that the configured alpha / tau give them.

Why: a gate that sits at its floor (or fully open) on every example does not discriminate between rejected
responses; it only rescales the rejected gradient. Pick tau inside the spread of p (e.g. its median) and alpha so
that the middle of the spread maps to g between about 0.1 and 0.9.

    .venv/bin/python scripts/gate_census.py dataset.arith.rejected_style=near [--pairs 64] [--alpha 50 --tau 0.05]

Any prefopt overrides (model=..., dataset=...) compose the config as `prefopt train` would.
"""

from __future__ import annotations

import argparse

import torch


def census(overrides: list[str], num_pairs: int) -> dict[str, torch.Tensor]:
    """Per-pair estimates under the initial policy: seq and q10 of chosen and rejected responses."""
    from hydra import compose, initialize_config_module

    from prefopt.data import build_preference_data
    from prefopt.data.layout import BatchLayout, pair_groups
    from prefopt.model.loading import load_model, load_tokenizer, resolve_model_source
    from prefopt.model.logps import sequence_logps, split_pairs
    from prefopt.model.precision import set_compute_dtype
    from prefopt.run.config import register_schema

    register_schema()
    with initialize_config_module(config_module="prefopt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    source = resolve_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    data = build_preference_data(cfg.dataset, tokenizer, cfg.trainer.seed)
    model = load_model(cfg.model, source, len(tokenizer), cfg.trainer.seed).eval()
    set_compute_dtype(model, cfg.model.dtype, "torch")
    pairs = data.train[:num_pairs]
    estimates: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, len(pairs), 8):
            groups = pair_groups(pairs[start : start + 8])
            batch = BatchLayout.from_trainer(cfg.trainer).build(groups, tokenizer.pad_token_id or 0)
            logps = sequence_logps(model, batch, cfg.trainer.logp_chunk_size)
            for side, summed, lengths, tokens, mask in zip(
                ("chosen", "rejected"),
                split_pairs(logps.summed),
                split_pairs(logps.lengths),
                split_pairs(logps.logps),
                split_pairs(logps.mask),
            ):
                token_probs = tokens.float().exp().masked_fill(mask <= 0, float("nan"))
                estimates.setdefault(f"{side}/seq", []).append((summed.float() / lengths.clamp(min=1)).exp())
                estimates.setdefault(f"{side}/q10", []).append(
                    torch.nanquantile(token_probs, cfg.loss.gate.quantile, dim=-1)
                )
    return {key: torch.cat(values) for key, values in estimates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="prefopt config overrides")
    parser.add_argument("--pairs", type=int, default=64, help="training pairs measured (the first N)")
    parser.add_argument("--alpha", type=float, default=50.0, help="gate steepness to evaluate")
    parser.add_argument("--tau", type=float, nargs="+", default=[0.05], help="gate thresholds to evaluate")
    args = parser.parse_args()
    estimates = census(args.overrides, args.pairs)
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    print(f"{len(next(iter(estimates.values())))} pairs | {' '.join(args.overrides)}")
    print(f"{'estimate':<14}" + "".join(f"{f'p{int(q * 100)}':>10}" for q in quantiles))
    for key, values in estimates.items():
        print(
            f"{key:<14}"
            + "".join(f"{value:>10.4f}" for value in torch.quantile(values.double(), quantiles.double()).tolist())
        )
    for kind in ("seq", "q10"):
        for tau in args.tau:
            gates = torch.sigmoid(args.alpha * (estimates[f"rejected/{kind}"].double() - tau))
            spread = torch.quantile(gates, quantiles.double()).tolist()
            print(
                f"gate {kind} alpha={args.alpha:g} tau={tau:g}: "
                + " ".join(f"{value:.2f}" for value in spread)
                + f" (p10..p90), below 0.5: {float((gates < 0.5).double().mean()):.0%}"
            )


if __name__ == "__main__":
    main()
