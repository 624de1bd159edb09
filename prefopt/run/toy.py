"""`prefopt toy`: the softmax toy of Ren & Sutherland ("Learning Dynamics of LLM Finetuning", ICLR 2025)
that shows the squeezing effect in a few lines of torch.

A linear model z = W x over K classes, on one fixed input x of unit norm, so an SGD step on
log p(y) moves the logits by exactly lr * (e_y - p) (the gradient of log p_y in W is (e_y - p) x^T):

    positive               ascent on log p(y), y a valley class: y rises, every other class falls
    negative_peak          descent on log p of the argmax class: its mass spreads to the other classes
    negative_valley        descent on log p(y), y a valley class: z_y falls, but every other logit rises
                           by lr * p_k, most for the peak, so the argmax gains and most others lose
                           (squeezing: the freed mass lands on the already-likely class)
    negative_valley_gated  the same step with its gradient scaled by the Gate-DPO gate
                           g = sigmoid(alpha * (p_y - tau)), p_y taken without gradient: a valley
                           target (p_y << tau) gets g near 0, so the squeeze is attenuated by g

Every case starts from the same W. `run_toy_case` is pure and returns the numbers; `prefopt toy` (a Hydra app
on conf/toy.yaml, built in prefopt/cli.py) plots them (`write_toy`) and prints the table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from omegaconf import DictConfig

from prefopt.core.errors import ConfigError
from prefopt.core.fileutil import atomic_write_json
from prefopt.core.runfiles import TOY_PLOT, TOY_RESULTS
from prefopt.losses.gate import scale_gradient
from prefopt.observe.plots import readable_axes, save_png

log = logging.getLogger("prefopt")


@dataclass(frozen=True)
class ToyCase:
    direction: int  # +1: gradient ascent on log p(target); -1: descent
    target: str  # "peak" (the argmax class) or "valley" (the class at valley_rank)
    gated: bool  # scale the gradient by the Gate-DPO gate


CASES = {
    "positive": ToyCase(+1, "valley", False),
    "negative_peak": ToyCase(-1, "peak", False),
    "negative_valley": ToyCase(-1, "valley", False),
    "negative_valley_gated": ToyCase(-1, "valley", True),
}


@dataclass
class ToyResult:
    case: str
    target: int  # the class whose log-prob the step moves
    argmax: int  # the initial argmax class
    gates: list[float]  # gate value per step (1.0 when ungated)
    probs_before: torch.Tensor  # (K,)
    probs_after: torch.Tensor  # (K,)
    weight_change: torch.Tensor  # (K, D) W_after - W_before

    def others(self) -> torch.Tensor:
        """Classes other than the target and the argmax."""
        keep = torch.ones_like(self.probs_before, dtype=torch.bool)
        keep[[self.target, self.argmax]] = False
        return keep

    def target_rank(self) -> int:
        """The target's rank by initial probability (0 = argmax)."""
        return int((self.probs_before.argsort(descending=True) == self.target).nonzero())

    def numbers(self) -> dict[str, float | int | str | list[float]]:
        change = (self.probs_after - self.probs_before)[self.others()]
        return {
            "case": self.case,
            "target": self.target,
            "target_rank": self.target_rank(),
            "argmax": self.argmax,
            "p_target_before": float(self.probs_before[self.target]),
            "p_target_after": float(self.probs_after[self.target]),
            "p_argmax_before": float(self.probs_before[self.argmax]),
            "p_argmax_after": float(self.probs_after[self.argmax]),
            "others_mean_change": float(change.mean()),
            "others_lost_fraction": float((change < 0).float().mean()),
            "gate": self.gates,
        }


def toy_problem(
    num_classes: int, input_dim: int, seed: int, logit_scale: float, peak_boost: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, x): x of unit norm and W with W x = logits, where logits ~ N(0, logit_scale^2) plus peak_boost
    on one class, so the distribution has one clear peak and deep valleys."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(input_dim, generator=generator, dtype=torch.float64)
    inputs = inputs / inputs.norm()
    logits = torch.randn(num_classes, generator=generator, dtype=torch.float64) * logit_scale
    logits[int(torch.randint(num_classes, (1,), generator=generator))] += peak_boost
    weight = 0.1 * torch.randn(num_classes, input_dim, generator=generator, dtype=torch.float64)
    weight = weight + torch.outer(logits - weight @ inputs, inputs)  # exact because |x| = 1
    return weight, inputs


def probabilities(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    return torch.softmax(weight @ inputs, dim=-1)


def gate_value(prob: torch.Tensor, alpha: float, tau: float) -> torch.Tensor:
    """The Gate-DPO gate g = sigmoid(alpha * (p - tau)) on the target's probability (no gradient)."""
    return torch.sigmoid(alpha * (prob.detach() - tau))


def sgd_step(
    weight: torch.Tensor, inputs: torch.Tensor, target: int, case: ToyCase, lr: float, alpha: float, tau: float
) -> tuple[torch.Tensor, float]:
    """One SGD step on direction * log p(target), the gradient scaled by the gate when gated: (new W, g)."""
    weight = weight.detach().clone().requires_grad_(True)
    target_logp = torch.log_softmax(weight @ inputs, dim=-1)[target]
    gate = gate_value(target_logp.exp(), alpha, tau) if case.gated else torch.ones((), dtype=weight.dtype)
    (gradient,) = torch.autograd.grad(case.direction * scale_gradient(target_logp, gate), weight)
    return (weight + lr * gradient).detach(), float(gate)


def case_target(case: ToyCase, probs: torch.Tensor, valley_rank: int) -> int:
    order = probs.argsort(descending=True)
    return int(order[0] if case.target == "peak" else order[valley_rank])


def run_toy_case(
    case: str,
    weight: torch.Tensor,
    inputs: torch.Tensor,
    lr: float,
    steps: int,
    valley_rank: int,
    gate_alpha: float,
    gate_tau: float,
) -> ToyResult:
    """`steps` SGD steps of one case from (weight, inputs); the gate is recomputed at every step."""
    spec = CASES[case]
    probs_before = probabilities(weight, inputs)
    target = case_target(spec, probs_before, valley_rank)
    updated, gates = weight, []
    for _ in range(steps):
        updated, gate = sgd_step(updated, inputs, target, spec, lr, gate_alpha, gate_tau)
        gates.append(gate)
    return ToyResult(
        case, target, int(probs_before.argmax()), gates, probs_before, probabilities(updated, inputs), updated - weight
    )


def check_toy_config(cfg: DictConfig) -> None:
    unknown = [case for case in cfg.cases if case not in CASES]
    if unknown or not cfg.cases:
        raise ConfigError(f"cases={list(cfg.cases)} is not valid; use a non-empty list of: {', '.join(CASES)}")
    if not 1 <= cfg.valley_rank < cfg.num_classes:
        raise ConfigError(
            f"valley_rank={cfg.valley_rank} must be in 1..num_classes-1 ({cfg.num_classes - 1}); 0 is the peak"
        )
    if cfg.steps < 1 or cfg.input_dim < 1 or cfg.num_classes < 3:
        raise ConfigError("steps and input_dim must be >= 1 and num_classes >= 3")


def run_toy(cfg: DictConfig) -> list[ToyResult]:
    check_toy_config(cfg)
    weight, inputs = toy_problem(cfg.num_classes, cfg.input_dim, cfg.seed, cfg.logit_scale, cfg.peak_boost)
    return [
        run_toy_case(case, weight, inputs, cfg.lr, cfg.steps, cfg.valley_rank, cfg.gate.alpha, cfg.gate.tau)
        for case in cfg.cases
    ]


def toy_table(results: list[ToyResult]) -> str:
    header = (
        "| case | target (rank) | p(target) before -> after | p(argmax) before -> after | others: mean change "
        "| others lost | g |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for result in results:
        n = result.numbers()
        lines.append(
            f"| {n['case']} | {n['target']} ({n['target_rank']}) "
            f"| {n['p_target_before']:.4f} -> {n['p_target_after']:.4f} "
            f"| {n['p_argmax_before']:.4f} -> {n['p_argmax_after']:.4f} | {n['others_mean_change']:+.5f} "
            f"| {n['others_lost_fraction']:.0%} | {', '.join(f'{g:.3f}' for g in n['gate'])} |"
        )
    return "\n".join(lines)


BEFORE_COLOR, AFTER_COLOR = "0.6", "tab:blue"
LEGEND = [
    Patch(color=BEFORE_COLOR, label="before"),
    Patch(color=AFTER_COLOR, label="after"),
    Patch(facecolor="none", edgecolor="red", linewidth=2, label="target class"),
]


def toy_figure(results: list[ToyResult]) -> Figure:
    """A row per case: before/after probabilities, classes sorted by initial probability (peak on the
    left), on a linear and a log scale; the target class is outlined in red."""
    figure = Figure(figsize=(13, 2.8 * len(results)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(results), 2, squeeze=False)
    order = results[0].probs_before.argsort(descending=True)  # every case starts from the same W
    ranks = torch.arange(len(order)).numpy()
    for row, result in zip(axes, results):
        before, after = result.probs_before[order].numpy(), result.probs_after[order].numpy()
        target_rank = result.target_rank()
        for axis, scale in zip(row, ("linear", "log")):
            axis.bar(ranks - 0.2, before, width=0.4, color=BEFORE_COLOR)
            bars = axis.bar(ranks + 0.2, after, width=0.4, color=AFTER_COLOR)
            bars[target_rank].set_edgecolor("red")
            bars[target_rank].set_linewidth(2)
            axis.set_yscale(scale)
            gates = ", ".join(f"{g:.3f}" for g in result.gates)
            axis.set_title(
                f"{result.case} (target: rank {target_rank}, g = {gates}) - {scale} scale", fontsize="medium"
            )
            readable_axes(axis, "class, by initial probability (0 = argmax)", "probability (0-1)")
            axis.set_xticks(ranks)
    figure.legend(
        handles=LEGEND, loc="outside lower center", ncols=len(LEGEND), frameon=False
    )  # one legend for every panel
    steps = len(results[0].gates)
    figure.suptitle(
        f"Softmax toy: {steps} SGD step(s) on log p(target) per case; a negative step on a valley class squeezes "
        "mass onto the argmax"
    )
    return figure


def write_toy(results: list[ToyResult], output_dir: Path) -> str:
    """The plots (TOY_PLOT) and the numbers (TOY_RESULTS) into output_dir; returns what `prefopt
    toy` prints: the table and what it wrote."""
    plot = save_png(toy_figure(results), output_dir / TOY_PLOT)
    atomic_write_json(output_dir / TOY_RESULTS, [result.numbers() for result in results])
    return f"{toy_table(results)}\n\nwrote {plot} and {output_dir / TOY_RESULTS}"
