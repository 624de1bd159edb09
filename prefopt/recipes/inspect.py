"""`prefopt inspect`'s worker job, top to bottom: build the data and the base model as training does, inspect every
pair of the chosen splits (train/inspection.py: reference log-probs, lengths, overlap, step-0 gates, CHES; cached),
optionally score a trained policy on the same pairs (how far training moved each one, and how often the run drew
it), and leave the table, its figures and the summary in the run dir (observe/inspection_report.py).

The parent half (which config, which policy) is run/eval_run.py prepare_inspect.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from prefopt.core.fileutil import atomic_write_json
from prefopt.core.runfiles import POLICY_DIR, SUMMARY_FILE
from prefopt.data import TokenizedPair
from prefopt.data.sampler import training_sampler
from prefopt.observe.inspection_report import write_inspection
from prefopt.train.build import build_policy, start_job
from prefopt.train.checkpoint import load_trainer_state
from prefopt.train.engine import load_policy_weights
from prefopt.train.inspection import Inspection, inspect_pairs
from prefopt.train.reference import base_fingerprint

POLICY_COLUMNS = ("policy_chosen_logps", "policy_rejected_logps", "chosen_change", "rejected_change", "visits")


def inspected_splits(cfg: DictConfig, data) -> dict[str, list[TokenizedPair]]:
    splits = {"train": data.train, "eval": data.eval}
    return splits if cfg.inspect.split == "both" else {cfg.inspect.split: splits[cfg.inspect.split]}


def run_visits(checkpoint: Path, num_pairs: int, trainer_cfg: DictConfig) -> list[int]:
    """How often the run drew each training pair up to the checkpoint: its sampler replayed from the start (seeded)
    for as many draws as the checkpoint's sampler state records (epochs x pairs + offset)."""
    state = load_trainer_state(checkpoint)
    sampler_state = state.get("sampler") or {}
    draws = sampler_state.get("epoch", 0) * num_pairs + sampler_state.get("offset", 0)
    step = max(int(state["step"]), 1)
    world_size = max(draws // (step * trainer_cfg.micro_batch_size * trainer_cfg.grad_accum), 1)
    counts = [0] * num_pairs
    for index in training_sampler(list(range(num_pairs)), trainer_cfg, world_size).next_indices(draws):
        counts[index] += 1
    return counts


def policy_columns(base: Inspection, trained: Inspection, visits: list[int] | None) -> dict[str, list[float]]:
    """The trained policy's log-probs of each pair and their change from the base model (the reference)."""
    chosen, rejected = trained.column("ref_chosen_logps"), trained.column("ref_rejected_logps")
    columns = {
        "policy_chosen_logps": chosen.tolist(),
        "policy_rejected_logps": rejected.tolist(),
        "chosen_change": (chosen - base.column("ref_chosen_logps")).tolist(),
        "rejected_change": (rejected - base.column("ref_rejected_logps")).tolist(),
    }
    columns["visits"] = visits if visits is not None else [0] * len(columns["chosen_change"])
    return columns


def top_pairs(tokenizer, pairs: list[TokenizedPair], inspection: Inspection, count: int) -> list[dict[str, Any]]:
    """The `count` pairs with the highest ches_norm, decoded (special tokens kept: what the model reads)."""
    values = inspection.column("ches_norm")
    order = torch.argsort(values, descending=True)[:count].tolist()
    return [
        {
            "index": index,
            "ches_norm": float(values[index]),
            "prompt": tokenizer.decode(pairs[index].prompt_ids)[-200:],
            "chosen": tokenizer.decode(pairs[index].chosen_ids)[:200],
            "rejected": tokenizer.decode(pairs[index].rejected_ids)[:200],
        }
        for index in order
    ]


def inspect_run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    started = time.time()
    job = start_job(cfg, run_dir)
    try:
        # the base model: the reference at step 0
        model = build_policy(cfg, job.source, job.tokenizer, job.device, job.dist)
        fingerprint = base_fingerprint(cfg, model, job.source, job.dist)
        splits = inspected_splits(cfg, job.data)
        inspections, pad_id = {}, job.tokenizer.pad_token_id
        for split, pairs in splits.items():
            with job.console.phase(f"inspecting {len(pairs)} {split} pairs"):
                inspections[split] = inspect_pairs(
                    model, pairs, cfg, job.source.identity, fingerprint, job.dist, job.device, pad_id
                )
        trained = {}
        if cfg.inspect.policy:  # prepare_inspect resolved it to a checkpoint, whose config this run took
            checkpoint = Path(cfg.inspect.policy)
            load_policy_weights(model, str(checkpoint / POLICY_DIR))
            for split, pairs in splits.items():
                with job.console.phase(f"scoring the trained policy on the {split} pairs"):
                    trained[split] = inspect_pairs(model, pairs, cfg, None, None, job.dist, job.device, pad_id)
        summary = {"inspect_seconds": time.time() - started}
        if job.dist.is_main:
            table: dict[str, list] = {"split": [], "index": []}
            for split, inspection in inspections.items():
                table["split"] += [split] * inspection.values.shape[0]
                table["index"] += list(range(inspection.values.shape[0]))
                for position, name in enumerate(inspection.columns):
                    table.setdefault(name, []).extend(inspection.values[:, position].tolist())
                if trained:
                    visits = run_visits(checkpoint, len(splits[split]), cfg.trainer) if split == "train" else None
                    for name, values in policy_columns(inspection, trained[split], visits).items():
                        table.setdefault(name, []).extend(values)
            shown = (
                top_pairs(job.tokenizer, splits["train"], inspections["train"], cfg.inspect.top_pairs)
                if "train" in inspections
                else []
            )
            write_inspection(run_dir, table, shown)  # the parent prints its summary (inspection.md)
            summary |= {f"inspect/{split}_pairs": len(pairs) for split, pairs in splits.items()}
            summary |= {f"inspect/{split}_cache": inspection.cache for split, inspection in inspections.items()}
            atomic_write_json(run_dir / SUMMARY_FILE, summary)
        return summary
    finally:
        job.console.close()
