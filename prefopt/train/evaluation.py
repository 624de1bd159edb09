"""Held-out evaluation: the loss's metrics on the eval pairs and greedy-answer accuracy, split across ranks.

Each rank scores a disjoint shard of the pairs (prompts) and one collective gives every rank the metrics
one rank alone would compute (sharding.py: strided shards, padding batches under ZeRO-3).
"""

from __future__ import annotations

from typing import Optional

import torch
from omegaconf import DictConfig

from prefopt.core.distributed import DistInfo
from prefopt.core.runfiles import DYNAMICS_FILE, TOKEN_VIEWS_FILE, TOP_GAINERS_FILE
from prefopt.data import TokenizedPair, answer_is_correct
from prefopt.data.layout import BatchLayout
from prefopt.losses.gate import gate_distribution
from prefopt.observe.console import (
    EVAL_PASS,
    GREEDY_PASS,
    PROBE_GENERATION_PASS,
    PROBE_PASS,
    TERM_GRADS_PASS,
)
from prefopt.train.dynamics import (
    ProbeSet,
    dynamics_deltas,
    generate_probes,
    greedy_generate,
    measure_probes,
    probe_metrics,
)
from prefopt.train.metrics import finish_token_means
from prefopt.train.sharding import pair_scored_tokens, sharded_pass
from prefopt.train.term_grads import TermGradients
from prefopt.train.token_views import (
    GAINER_COLUMNS,
    TOP_GAINERS_TABLE,
    ProbeTokens,
    token_decoder,
    token_rows,
    top_gainers,
)

GATE_COLUMN = "gate"  # the per-example gate travels as one more column of the gathered rows


@torch.no_grad()
def evaluate(
    step_fn,
    pairs: list[TokenizedPair],
    batch_size: int,
    max_batches: Optional[int],
    step: int,
    dist: Optional[DistInfo] = None,
) -> dict[str, float]:
    """Means over the eval pairs (the first max_batches x batch_size, or all) of step_fn's per-example
    metrics at training step `step` (losses with a schedule, dpo_shift, use that step's progress), and the
    gate's spread when gated. step_fn is the trainer's PreferenceStep (step.py)."""
    if max_batches is not None:
        pairs = pairs[: max_batches * batch_size]
    if not pairs:
        return {}
    keys: list[str] = []

    def score(indices: list[int], peer_scored_tokens: int) -> torch.Tensor:
        result = step_fn([pairs[index] for index in indices], step, min_scored_tokens=peer_scored_tokens)
        columns = dict(result.per_example) | ({GATE_COLUMN: result.gates} if result.gates is not None else {})
        keys[:] = list(columns)
        return torch.stack([value.detach().float().cpu() for value in columns.values()], dim=1)

    step_fn.policy.eval()
    try:
        values = sharded_pass(
            len(pairs), batch_size, dist or DistInfo(), score, lambda index: pair_scored_tokens(pairs[index])
        )
    finally:
        step_fn.policy.train()
    columns = dict(zip(keys, values.unbind(dim=1)))
    gates = columns.pop(GATE_COLUMN, None)
    metrics = finish_token_means({f"eval/{key}": float(column.mean()) for key, column in columns.items()}, "eval")
    if (
        gates is not None
    ):  # the gate's spread over held-out pairs: a gate shut (or open) on every example does not discriminate
        metrics.update({f"eval/{key}": value for key, value in gate_distribution(gates).items()})
    return metrics


def greedy_accuracy(
    model, tokenizer, pairs: list[TokenizedPair], max_new_tokens: int, device, dist: Optional[DistInfo] = None
):
    """Greedy answers to held-out prompts that carry a reference answer; returns (accuracy, examples)."""
    pairs = [pair for pair in pairs if pair.answer is not None]
    if not pairs:
        return None, []
    generations = greedy_generate(
        model, tokenizer, [list(pair.prompt_ids) for pair in pairs], max_new_tokens, device, dist=dist
    )
    examples = [
        [pair.prompt, text, pair.answer, answer_is_correct(text, pair.answer)] for pair, text in zip(pairs, generations)
    ]
    return sum(example[3] for example in examples) / len(examples), examples


class RunEvaluator:
    """A run's evaluations at a step, logged to its tracker and console; training and `prefopt eval` both use
    it, so an eval of a checkpoint is the eval its run logged. step_fn: step.PreferenceStep (its policy
    is the one evaluated); tracker: tracking.Tracker; console: console.Console. token_baseline: the per-token
    values of the run's first probe evaluation (step 0), that later token views are measured from; None until
    then (a resumed run passes its checkpoint's)."""

    def __init__(
        self,
        cfg: DictConfig,
        step_fn,
        tokenizer,
        data,
        probes: Optional[ProbeSet],
        term_grads: Optional[TermGradients],
        device: torch.device,
        dist: DistInfo,
        tracker,
        console,
        token_baseline: Optional[ProbeTokens] = None,
    ):
        self.cfg, self.step_fn, self.tokenizer, self.data, self.probes = cfg, step_fn, tokenizer, data, probes
        self.term_grads = term_grads
        self.device, self.dist, self.tracker, self.console = device, dist, tracker, console
        self.token_baseline = token_baseline
        self.decode = token_decoder(tokenizer)

    def pass_plan(self) -> tuple[dict[str, int], list[str]]:
        """The passes training makes with this evaluator, for the console's ETA (console.scheduled_passes): kind ->
        every N steps between the steps (prefopt/recipes/train.py train_steps), and the kinds made once after the last
        step (its final eval with greedy answers, then the probes)."""
        trainer_cfg, dynamics_cfg = self.cfg.trainer, self.cfg.dynamics
        probe_every = dynamics_cfg.every_n_steps if self.probes is not None else 0
        every = {
            EVAL_PASS: trainer_cfg.eval_every,
            PROBE_PASS: probe_every,
            TERM_GRADS_PASS: probe_every if self.term_grads is not None else 0,
            PROBE_GENERATION_PASS: probe_every if dynamics_cfg.generate and dynamics_cfg.num_generate else 0,
        }
        final = [EVAL_PASS, *([GREEDY_PASS] if trainer_cfg.greedy_eval_examples else [])]
        return every, final + [kind for kind in every if kind != EVAL_PASS and every[kind]]

    def held_out(self, step: int, generate: bool) -> tuple[dict[str, float], Optional[float]]:
        """The loss's metrics on the eval pairs at `step` and, when `generate`, greedy-answer accuracy:
        (metrics, accuracy or None)."""
        trainer_cfg, policy = self.cfg.trainer, self.step_fn.policy
        with self.console.phase(f"{EVAL_PASS} @ step {step}"):
            metrics = evaluate(
                self.step_fn, self.data.eval, trainer_cfg.eval_batch_size, trainer_cfg.max_eval_batches, step, self.dist
            )
        accuracy = None
        if generate and trainer_cfg.greedy_eval_examples:
            with self.console.phase(f"{GREEDY_PASS} @ step {step}"):
                accuracy, examples = greedy_accuracy(
                    policy,
                    self.tokenizer,
                    self.data.eval[: trainer_cfg.greedy_eval_examples],
                    trainer_cfg.max_new_tokens,
                    self.device,
                    self.dist,
                )
            if accuracy is not None:
                metrics["eval/greedy_accuracy"] = accuracy
                self.tracker.log_table(
                    "eval/generations", step, ["prompt", "generation", "answer", "correct"], examples
                )
        self.tracker.log(step, metrics)
        self.console.eval_result(step, metrics)
        return metrics, accuracy

    def probe_set(self, step: int) -> dict[str, float]:
        """The probe set's log-probs at `step` (dynamics.jsonl) with the per-term gradient norms when
        dynamics.term_grads (term_grads.py), its token views (dynamics.token_views), and a few probe generations when
        dynamics.generate."""
        if self.probes is None:
            return {}
        trainer_cfg, dynamics_cfg, policy = self.cfg.trainer, self.cfg.dynamics, self.step_fn.policy
        with self.console.phase(f"{PROBE_PASS} @ step {step}"):
            measure = measure_probes(
                policy,
                self.probes,
                trainer_cfg.logp_chunk_size,
                self.device,
                dynamics_cfg.batch_size,
                BatchLayout.from_trainer(trainer_cfg),
                self.dist,
                token_views=dynamics_cfg.token_views,
            )
        metrics = probe_metrics(measure.stats, self.probes)
        if self.term_grads is not None:  # the same row: one line of dynamics.jsonl per probe step
            with self.console.phase(f"{TERM_GRADS_PASS} @ step {step}"):
                metrics |= self.term_grads(step)
        self.tracker.log(step, metrics, file=DYNAMICS_FILE)
        if measure.tokens is not None:
            self.token_views(step, measure.tokens)
        if dynamics_cfg.generate and dynamics_cfg.num_generate:
            with self.console.phase(f"{PROBE_GENERATION_PASS} @ step {step}"):
                rows = generate_probes(
                    policy,
                    self.tokenizer,
                    self.probes,
                    dynamics_cfg.num_generate,
                    dynamics_cfg.max_new_tokens,
                    self.device,
                    self.dist,
                )
            self.tracker.log_table("dynamics/generations", step, ["prompt", "generation"], rows)
        return metrics

    def token_views(self, step: int, tokens: ProbeTokens) -> None:
        """The per-token rows at `step` (token_views.jsonl) and, after the baseline, the top gainers
        (top_gainers.jsonl and a W&B table). The first evaluation without a baseline becomes it."""
        if self.token_baseline is None:
            self.token_baseline = tokens
        if not self.dist.is_main:  # every rank holds the same baseline; only rank 0 writes (and checkpoints it)
            return
        self.tracker.append_rows(TOKEN_VIEWS_FILE, token_rows(step, tokens, self.token_baseline, self.decode))
        count = self.cfg.dynamics.top_gainers
        if count and tokens is not self.token_baseline:  # at the baseline itself nothing has gained
            rows = top_gainers(tokens, self.token_baseline, count, self.decode)
            self.tracker.log_table(TOP_GAINERS_TABLE, step, GAINER_COLUMNS, rows, file=TOP_GAINERS_FILE)


def eval_changes(
    first_eval: dict[str, float],
    final_eval: dict[str, float],
    first_greedy: Optional[float],
    final_greedy: Optional[float],
    first_dynamics: dict[str, float],
    final_dynamics: dict[str, float],
) -> dict[str, float]:
    """The summary's changes from the first evaluation (the base model) to the last: eval/delta/*, greedy accuracy
    before/after, and the probe deltas (delta/*). Empty parts (no first eval, no probes) add nothing."""
    changes = {}
    for key in ("logps/chosen", "logps/rejected", "rewards/margins"):
        if f"eval/{key}" in first_eval and f"eval/{key}" in final_eval:
            changes[f"eval/delta/{key}"] = final_eval[f"eval/{key}"] - first_eval[f"eval/{key}"]
    if first_greedy is not None:
        changes["eval/greedy_accuracy_before"] = first_greedy
        changes["eval/greedy_accuracy_after"] = final_greedy
    if first_dynamics and final_dynamics:
        changes |= dynamics_deltas(first_dynamics, final_dynamics)
    return changes
