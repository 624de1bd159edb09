"""prefopt's losses against TRL's DPOTrainer on the same log-probs: value and gradient, one row per loss both name.

    .venv-bench/bin/python scripts/check_losses_vs_trl.py        # the bench venv has TRL (1.16 when this was written)

TRL computes its loss inside `DPOTrainer._compute_loss(model, inputs)`, from the per-token log-probs its model
returns. This script calls that method unbound, with a stand-in for the trainer (the attributes the method reads)
and a stand-in model that returns fixed per-token log-probs (a leaf tensor), with the reference log-probs given as
precomputed. prefopt's `preference_loss` gets the same tokens summed per response and the response lengths. Both
gradients are taken with respect to the same per-token log-probs. Rows where the two differ by design say why;
nothing is left out. Prints a markdown table; exits 1 if a row marked equal is not.
"""

import sys
import types
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    import omegaconf  # noqa: F401
except ImportError:  # the bench venv has TRL, not prefopt's config stack; the losses only type-check against these
    stub = types.ModuleType("omegaconf")
    stub.DictConfig = type("DictConfig", (), {})
    stub.OmegaConf = type("OmegaConf", (), {})
    sys.modules["omegaconf"] = stub

import trl  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

from prefopt.losses import get_loss, preference_loss  # noqa: E402

BATCH, MAX_LEN, SEED = 8, 12, 0
# TRL holds EXO's eps as a float32 tensor, so log(eps) and log(1 - eps) carry float32 rounding into a float64 run
EXO_TOLERANCE = 1e-7
EXO_NOTE = "TRL takes log(eps), log(1 - eps) in float32 (eps is a float32 tensor): float32 rounding, so 1e-7 here"
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}  # max |diff| relative to max(1, |value|)


class Row(SimpleNamespace):
    """One comparison: TRL's loss_type and arguments, prefopt's preset and hyperparameters, why they may differ."""

    trl: str
    trl_args: dict
    preset: str
    hyperparameters: dict
    expect_equal: bool = True
    note: str = ""
    dtype: torch.dtype = torch.float64

    @property
    def tolerance(self) -> float:
        return EXO_TOLERANCE if self.trl == "exo_pair" else TOLERANCE[self.dtype]


def rows():
    """Every TRL 1.x loss_type prefopt names, with prefopt's preset defaults passed to TRL where TRL has the knob."""
    same = [
        ("sigmoid", {}, "dpo", ""),
        ("hinge", {}, "hinge", ""),
        ("ipo", {}, "ipo", "both average the log-ratios per token (prefopt: `length_average: true`, the default)"),
        ("exo_pair", {"label_smoothing": 1e-3}, "exo_pair", EXO_NOTE),
        ("nca_pair", {}, "nca_pair", ""),
        ("robust", {"label_smoothing": 0.1}, "robust_dpo", ""),
        ("bco_pair", {}, "bco_pair", "both without the paper's running-mean shift delta (TRL 0.2x had it)"),
        ("sppo_hard", {}, "sppo_hard", ""),
        ("aot", {}, "aot", "sorted over the batch the loss sees (one micro-batch here, the per-device batch in TRL)"),
        ("aot_unpaired", {}, "aot_unpaired", "TRL 0.2x named it `aot_pair`"),
        ("apo_zero", {}, "apo_zero", ""),
        ("apo_down", {}, "apo_down", ""),
        ("discopop", {"discopop_tau": 0.05}, "discopop", ""),
        ("sigmoid_norm", {}, "dpo_norm", ""),
    ]
    out = [Row(trl=t, trl_args=a, preset=p, hyperparameters=preset_defaults(p), note=n) for t, a, p, n in same]
    out += [
        Row(
            trl="sigmoid",
            trl_args={"label_smoothing": 0.1},
            preset="cdpo",
            hyperparameters=preset_defaults("cdpo"),
            expect_equal=False,
            note="by design: TRL 1.x ignores label_smoothing for sigmoid (= dpo); TRL 0.2x "
            "applied it (cDPO), as prefopt's `cdpo` does",
        ),
        Row(
            trl="ipo",
            trl_args={},
            preset="ipo",
            hyperparameters={**preset_defaults("ipo"), "length_average": False},
            expect_equal=False,
            note="by design: `length_average: false` sums the log-ratios, as the IPO paper and "
            "OpenRLHF; TRL averages them",
        ),
        Row(
            trl="sft",
            trl_args={},
            preset="sft",
            hyperparameters={},
            expect_equal=False,
            note="by design: TRL takes the mean over all chosen tokens of the batch; prefopt the mean over pairs of "
            "each response's mean token NLL (equal when all chosen responses have one length)",
        ),
    ]
    for trl_type, divergence, coef, f_alpha in [
        ("sigmoid", "forward_kl", None, None),
        ("sigmoid", "js_divergence", None, None),
        ("hinge", "js_divergence", None, None),
        ("robust", "forward_kl", None, None),
        ("ipo", "forward_kl", None, None),
        ("exo_pair", "js_divergence", None, None),
        ("discopop", "forward_kl", None, None),
        ("sigmoid_norm", "js_divergence", None, None),
        ("sigmoid", "alpha_divergence", 0.5, 0.5),
        ("sigmoid", "alpha_divergence", 0.3, 0.7),
        ("sigmoid_norm", "alpha_divergence", 0.8, 0.2),
    ]:
        preset = {"sigmoid": "dpo", "robust": "robust_dpo", "sigmoid_norm": "dpo_norm"}.get(trl_type, trl_type)
        trl_args = dict(same_args(trl_type, same), f_divergence_type=divergence)
        hyperparameters = {**preset_defaults(preset), "f_divergence": divergence.replace("_divergence", "")}
        note = EXO_NOTE if preset == "exo_pair" else ""
        dtype = torch.float64
        if coef is not None:
            trl_args["f_alpha_divergence_coef"] = coef
            hyperparameters["f_alpha"] = f_alpha
            note += (
                f"TRL's coef {coef} = prefopt f_alpha {f_alpha} (TRL writes (u^(c-1) - 1)/(c-1), the paper "
                "(1 - u^-a)/a); float32: TRL's alpha clamp has no float64 entry"
            )
            dtype = torch.float32
        out.append(
            Row(trl=trl_type, trl_args=trl_args, preset=preset, hyperparameters=hyperparameters, note=note, dtype=dtype)
        )
    return out


def same_args(trl_type, same):
    return next(args for name, args, _, _ in same if name == trl_type)


def preset_defaults(preset):
    """The preset's hyperparameters (conf/loss/<preset>.yaml = the registered defaults), beta set to TRL's 0.1."""
    values = dict(vars(get_loss(preset).params()))
    if "beta" in values:
        values["beta"] = 0.1
    return values


def random_tokens(dtype):
    """Per-token policy log-probs (2B, T-1) laid out as TRL's model returns them ([chosen; rejected], shifted),
    the completion mask (2B, T), reference sums (2B,), all with unequal response lengths."""
    generator = torch.Generator().manual_seed(SEED)
    lengths = torch.randint(1, MAX_LEN - 1, (2 * BATCH,), generator=generator)
    completion_mask = torch.zeros(2 * BATCH, MAX_LEN, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        completion_mask[row, 1 : 1 + length] = 1  # position 0 is the prompt
    shifted = completion_mask[:, 1:].to(dtype)
    token_logps = -torch.rand(2 * BATCH, MAX_LEN - 1, generator=generator, dtype=torch.float64) * 3 - 0.05
    token_logps = (token_logps * shifted.double()).to(dtype)
    reference = token_logps.double().sum(1) + torch.randn(2 * BATCH, generator=generator, dtype=torch.float64)
    return token_logps, completion_mask, reference.to(dtype)


def trl_loss(row, token_logps, completion_mask, reference):
    """TRL's loss, computed by DPOTrainer._compute_loss on the stand-in trainer and model."""
    args = {
        "beta": 0.1,
        "label_smoothing": 0.0,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        "discopop_tau": 0.05,
        **row.trl_args,
    }
    model = SimpleNamespace(training=True)

    def forward(**_):
        zeros = torch.zeros_like(token_logps, dtype=torch.float32)
        return SimpleNamespace(
            log_probs=token_logps, entropy=zeros, mean_logits=zeros, is_top1=torch.zeros_like(zeros, dtype=torch.bool)
        )

    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        use_weighting=False,
        loss_types=[row.trl],
        loss_weights=[1.0],
        beta=args["beta"],
        label_smoothing=args["label_smoothing"],
        f_divergence_type=args["f_divergence_type"],
        f_alpha_divergence_coef=args["f_alpha_divergence_coef"],
        args=SimpleNamespace(discopop_tau=args["discopop_tau"], gradient_checkpointing_kwargs=None),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": reference[:BATCH],
        "ref_rejected_logps": reference[BATCH:],
    }
    return DPOTrainer._compute_loss(trainer, forward, inputs, return_outputs=False)


def prefopt_loss(row, token_logps, completion_mask, reference):
    sums, lengths = token_logps.sum(1), completion_mask.sum(1)
    return preference_loss(
        row.preset,
        policy_chosen_logps=sums[:BATCH],
        policy_rejected_logps=sums[BATCH:],
        reference_chosen_logps=reference[:BATCH],
        reference_rejected_logps=reference[BATCH:],
        chosen_lengths=lengths[:BATCH],
        rejected_lengths=lengths[BATCH:],
        **row.hyperparameters,
    ).loss


def compare(row):
    """(|value diff|, max |grad diff|, TRL's value) on one random batch."""
    token_logps, completion_mask, reference = random_tokens(row.dtype)
    results = []
    for compute in (trl_loss, prefopt_loss):
        leaf = token_logps.clone().requires_grad_(True)
        loss = compute(row, leaf, completion_mask, reference)
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((loss.detach().double(), grad.double()))
    (trl_value, trl_grad), (prefopt_value, prefopt_grad) = results
    return float((trl_value - prefopt_value).abs()), float((trl_grad - prefopt_grad).abs().max()), float(trl_value)


def main():
    print(
        f"TRL {trl.__version__}, torch {torch.__version__}; batch {BATCH} pairs, response lengths 1..{MAX_LEN - 2}, "
        f"beta 0.1; tolerance {TOLERANCE[torch.float64]:g} (float64), {TOLERANCE[torch.float32]:g} (float32)\n"
    )
    print(
        "| name in TRL 1.x | TRL arguments | prefopt preset | max \\|value diff\\| | max \\|grad diff\\| "
        "| equal? | note |"
    )
    print("|---|---|---|---|---|---|---|")
    failures = []
    for row in rows():
        value_diff, grad_diff, value = compare(row)
        equal = max(value_diff, grad_diff) <= row.tolerance * max(1.0, abs(value))
        if equal != row.expect_equal:
            failures.append(row)
        verdict = "yes" if equal else "**no**" + ("" if row.expect_equal else " (by design)")
        args = ", ".join(f"{k}={v}" for k, v in row.trl_args.items()) or "-"
        overrides = {k: v for k, v in row.hyperparameters.items() if preset_defaults(row.preset).get(k) != v}
        preset = f"`{row.preset}`" + "".join(f" {k}={v}" for k, v in overrides.items())
        print(f"| `{row.trl}` | {args} | {preset} | {value_diff:.1e} | {grad_diff:.1e} | {verdict} | {row.note} |")
    if failures:
        print(f"\nunexpected: {', '.join(f'{r.trl} vs {r.preset}' for r in failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
