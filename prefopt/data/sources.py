"""Where rows come from: the arith generator, local files (files.py), or what `datasets` loads by name (hub.py).

    dataset.path                         read by                      splits
    a file, or a glob of files           files.py, through datasets   eval_fraction held out by the seed
    a save_to_disk directory             load_from_disk               a Dataset: held out; a DatasetDict: by name
    any other directory (a repository)   load_dataset(dir, subset)    by name (train_split / eval_split)
    a hub id                             load_dataset(id, subset)     by name

Every source gives two `RawSplit`s (train, eval) of untouched rows; formats.py makes sense of them.
A source with a single split (a local file, or eval_split=null) holds out eval_fraction of its rows,
chosen by the seed. The `RawSource` also says what identifies the data's content (its files, or the
`datasets` fingerprint), which keys the tokenized-pairs cache (cache.py).
"""
from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from omegaconf import DictConfig

from prefopt.errors import ConfigError
from prefopt.data.arith import generate_arith_rows
from prefopt.data.files import BUILDERS, SUPPORTED, data_files, read_data_files
from prefopt.data.hub import is_saved_dataset, load_named_split, load_saved, saved_split


@dataclass
class RawSplit:
    origin: str  # "file /x/pairs.jsonl" or "hub dataset Anthropic/hh-rlhf split train": starts every error
    rows: Sequence[Any]  # all rows of the source (a list, or a datasets.Dataset: both index by position)
    indices: list[int]  # positions of this split's rows in `rows` (0-based, the pairs' source_index), in source order
    positions: Optional[Sequence[str]] = None  # each row's position as users count it ("line 8"); None: "row N"

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for index in self.indices:
            yield index, self.rows[index]

    def position(self, index: int) -> str:
        """The row at `index` of `rows` as users count it (files.py): "line 8", "row 3", "b.jsonl, line 8"."""
        if self.positions is not None:
            return self.positions[index]
        return f"row {index + 1}"

    def where(self, index: int) -> str:
        """Origin and position, which start every message about one row."""
        return f"{self.origin}, {self.position(index)}"


@dataclass
class RawSource:
    train: RawSplit
    eval: RawSplit
    files: Optional[list[Path]] = None  # local files whose bytes are the data (they key the tokenized cache)
    fingerprint: Optional[str] = None  # else what `datasets` says identifies the loaded splits (hub data)
    # neither: the data is generated (arith), which is as quick as reading a cache: nothing is cached


def load_raw_splits(dataset_cfg: DictConfig, seed: int) -> RawSource:
    if dataset_cfg.name == "arith":
        train_rows, eval_rows = generate_arith_rows(dataset_cfg.arith, seed)
        origin = f"arith generator (seed {seed})"
        return RawSource(
            RawSplit(f"{origin} train", train_rows, list(range(len(train_rows)))),
            RawSplit(f"{origin} eval", eval_rows, list(range(len(eval_rows)))),
        )
    if not dataset_cfg.path:
        raise ConfigError(
            f"dataset.path is empty for dataset.name={dataset_cfg.name}: give a local file (dataset.path=/path/to/file.jsonl; "
            f"{SUPPORTED}), a glob, a directory or a hub id"
        )
    path = os.path.expanduser(dataset_cfg.path)
    if os.path.isdir(path):
        return load_directory(dataset_cfg, Path(path), seed)
    if dataset_cfg.name == "local" or os.path.exists(path) or looks_like_local_path(path):
        files = data_files(path)
        origin = f"file {path}" if not glob.has_magic(path) else f"files {path} ({len(files)} files)"
        read = read_data_files(files, origin)
        train, held_out = hold_out(origin, read.rows, dataset_cfg.eval_fraction, seed, read.positions)
        return RawSource(train, held_out, files=files)
    return load_hub_source(dataset_cfg, seed)


def looks_like_local_path(path: str) -> bool:
    """A missing local file must be reported as missing, not looked up on the hub."""
    return path.startswith((".", "/", "~")) or path.endswith(tuple(BUILDERS)) or glob.has_magic(path)


def load_directory(dataset_cfg: DictConfig, directory: Path, seed: int) -> RawSource:
    """A save_to_disk directory, or a dataset repository on disk (a clone of a hub dataset, or data files
    laid out the way load_dataset reads them). Its files' bytes identify it (hidden files left out)."""
    files = sorted(
        path for path in directory.rglob("*") if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )
    if is_saved_dataset(directory):
        import datasets

        saved = load_saved(directory)
        origin = f"saved dataset {directory}"
        if not isinstance(saved, datasets.DatasetDict):  # a Dataset: one split
            train, held_out = hold_out(origin, saved, dataset_cfg.eval_fraction, seed)
            return RawSource(train, held_out, files=files)
        train, held_out = named_splits(origin, lambda split: saved_split(saved, split, origin), dataset_cfg, seed)
        return RawSource(train, held_out, files=files)
    origin = f"dataset directory {directory}" + (f" ({dataset_cfg.subset})" if dataset_cfg.subset else "")

    def load(split: str):
        return load_named_split(str(directory), dataset_cfg.subset, dataset_cfg.data_dir, split, local=True)

    train, held_out = named_splits(origin, load, dataset_cfg, seed)
    return RawSource(train, held_out, files=files)


def load_hub_source(dataset_cfg: DictConfig, seed: int) -> RawSource:
    hub_id, subset = dataset_cfg.path, dataset_cfg.subset
    origin = f"hub dataset {hub_id}" + (f" ({subset})" if subset else "")
    loaded = []

    def load(split: str):
        rows = load_named_split(hub_id, subset, dataset_cfg.data_dir, split, local=False)
        loaded.append(rows)
        return rows

    train, held_out = named_splits(origin, load, dataset_cfg, seed)
    fingerprints = [getattr(rows, "_fingerprint", None) for rows in loaded]
    return RawSource(train, held_out, fingerprint="/".join(fingerprints) if all(fingerprints) else None)


def named_splits(origin: str, load: Callable[[str], Sequence[Any]], dataset_cfg: DictConfig, seed: int) -> tuple[RawSplit, RawSplit]:
    """train_split and eval_split by name, or eval_fraction of train_split held out when eval_split is null."""
    train_rows = load(dataset_cfg.train_split)
    if dataset_cfg.eval_split is None:
        return hold_out(f"{origin} split {dataset_cfg.train_split}", train_rows, dataset_cfg.eval_fraction, seed)
    eval_rows = load(dataset_cfg.eval_split)
    return (
        RawSplit(f"{origin} split {dataset_cfg.train_split}", train_rows, list(range(len(train_rows)))),
        RawSplit(f"{origin} split {dataset_cfg.eval_split}", eval_rows, list(range(len(eval_rows)))),
    )


def hold_out(
    origin: str, rows: Sequence[Any], eval_fraction: float, seed: int, positions: Optional[Sequence[str]] = None
) -> tuple[RawSplit, RawSplit]:
    """Split one source into train and eval by the seed; both keep source order."""
    total = len(rows)
    eval_count = round(total * eval_fraction)
    if eval_fraction > 0 and total >= 2:
        eval_count = min(max(eval_count, 1), total - 1)  # both splits keep at least one row
    eval_indices = set(random.Random(seed).sample(range(total), eval_count))
    train = [index for index in range(total) if index not in eval_indices]
    return (
        RawSplit(f"{origin} (train part)", rows, train, positions),
        RawSplit(f"{origin} (held-out part)", rows, sorted(eval_indices), positions),
    )
