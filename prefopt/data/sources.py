"""Where rows come from: the arith generator, a local .json/.jsonl/.parquet file, or a hub dataset.

Every source gives two `RawSplit`s (train, eval) of untouched rows; formats.py makes sense of them.
A source with a single split (a local file, or eval_split=null) holds out eval_fraction of its rows,
chosen by the seed.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig

from prefopt.config import ConfigError
from prefopt.data.arith import generate_arith_rows
from prefopt.data.errors import DataError

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass
class RawSplit:
    origin: str  # "file /x/pairs.jsonl" or "hub dataset Anthropic/hh-rlhf (helpful-base) split train": starts every error
    rows: Sequence[Any]  # all rows of the source (a list, or a datasets.Dataset: both index by position)
    indices: list[int]  # positions of this split's rows in `rows`, in source order; the row index errors report

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for index in self.indices:
            yield index, self.rows[index]


def load_raw_splits(dataset_cfg: DictConfig, seed: int) -> tuple[RawSplit, RawSplit]:
    if dataset_cfg.name == "arith":
        train_rows, eval_rows = generate_arith_rows(dataset_cfg.arith, seed)
        origin = f"arith generator (seed {seed})"
        return (
            RawSplit(f"{origin} train", train_rows, list(range(len(train_rows)))),
            RawSplit(f"{origin} eval", eval_rows, list(range(len(eval_rows)))),
        )
    if not dataset_cfg.path:
        raise ConfigError(
            f"dataset.path is empty for dataset.name={dataset_cfg.name}: give a local file "
            f"(dataset.path=/path/to/file.jsonl; .json, .jsonl or .parquet) or a hub id"
        )
    path = os.path.expanduser(dataset_cfg.path)
    if dataset_cfg.name == "local" or os.path.exists(path) or looks_like_local_path(path):
        rows = read_local_file(path)
        return hold_out(f"file {path}", rows, dataset_cfg.eval_fraction, seed)
    return load_hub_splits(dataset_cfg, seed)


def looks_like_local_path(path: str) -> bool:
    """A missing local file must be reported as missing, not looked up on the hub."""
    return path.startswith((".", "/", "~")) or path.endswith(LOCAL_SUFFIXES)


def read_local_file(path: str) -> list:
    """All rows of a .json (a list of objects, or JSON lines), .jsonl or .parquet file, read offline."""
    if not os.path.isfile(path):
        raise DataError(f"dataset.path={path} does not exist (or is not a file); give an existing .json, .jsonl or .parquet file")
    if not path.endswith(LOCAL_SUFFIXES):
        raise DataError(f"dataset.path={path}: unsupported file type; use a .json, .jsonl or .parquet file")
    if path.endswith(".parquet"):
        import pyarrow.parquet

        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise DataError(f"file {path} is not a readable parquet file: {error}") from None
    else:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        rows = parse_json_rows(path, text)
    if not rows:
        raise DataError(f"file {path} has no rows")
    return rows


def parse_json_rows(path: str, text: str) -> list:
    # A .json file may hold JSON lines (as `datasets` accepts), so try one document first, then lines.
    if not path.endswith(".jsonl"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            pass
        else:
            if isinstance(document, dict):  # a single JSON-lines row, or an object that is not a row list
                document = [document] if len(text.strip().splitlines()) == 1 else None
            if not isinstance(document, list):
                raise DataError(f"file {path} must hold a list of objects (one per row) or JSON lines (one object per line)")
            return document
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"file {path}, line {line_number}: not valid JSON ({error.msg}); fix or remove the line") from None
    return rows


def hold_out(origin: str, rows: Sequence[Any], eval_fraction: float, seed: int) -> tuple[RawSplit, RawSplit]:
    """Split one source into train and eval by the seed; both keep source order."""
    total = len(rows)
    eval_count = round(total * eval_fraction)
    if eval_fraction > 0 and total >= 2:
        eval_count = min(max(eval_count, 1), total - 1)  # both splits keep at least one row
    eval_indices = set(random.Random(seed).sample(range(total), eval_count))
    train = [index for index in range(total) if index not in eval_indices]
    return (
        RawSplit(f"{origin} (train part)", rows, train),
        RawSplit(f"{origin} (held-out part)", rows, sorted(eval_indices)),
    )


def load_hub_splits(dataset_cfg: DictConfig, seed: int) -> tuple[RawSplit, RawSplit]:
    hub_id, subset = dataset_cfg.path, dataset_cfg.subset
    label = f"hub dataset {hub_id}" + (f" ({subset})" if subset else "")
    train_rows = load_hub_split(hub_id, subset, dataset_cfg.train_split)
    if dataset_cfg.eval_split is None:
        return hold_out(f"{label} split {dataset_cfg.train_split}", train_rows, dataset_cfg.eval_fraction, seed)
    eval_rows = load_hub_split(hub_id, subset, dataset_cfg.eval_split)
    return (
        RawSplit(f"{label} split {dataset_cfg.train_split}", train_rows, list(range(len(train_rows)))),
        RawSplit(f"{label} split {dataset_cfg.eval_split}", eval_rows, list(range(len(eval_rows)))),
    )


def load_hub_split(hub_id: str, subset: str | None, split: str):
    """One split through `datasets`; offline it reads only the local cache and fails in about a second."""
    import datasets

    from prefopt.models import hub_reachable

    offline = datasets.config.HF_HUB_OFFLINE or not hub_reachable()
    try:
        with hub_offline_mode(offline):
            return datasets.load_dataset(hub_id, data_dir=subset, split=split)
    except Exception as error:  # datasets raises ConnectionError, FileNotFoundError, ValueError, ... here
        reason = "the hub cannot be reached (offline?) and it is not in the local cache" if offline else str(error)
        raise DataError(
            f"hub dataset {hub_id}" + (f" ({subset})" if subset else "") + f" split {split} could not be loaded: "
            f"{reason}. Download it where there is internet, or pass a local file in the same schema: "
            f"dataset.path=/path/to/file.jsonl (.json, .jsonl or .parquet)"
        ) from error


@contextlib.contextmanager
def hub_offline_mode(offline: bool):
    """Without this, `datasets` retries an unreachable hub for ~25 s per file. The flags are read at
    import time, so the environment variable would come too late; set the module constants instead."""
    if not offline:
        yield
        return
    import datasets
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
