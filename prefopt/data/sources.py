"""Where rows come from: the arith generator, local files (files.py), or what `datasets` loads by name (hub.py).

    dataset.path                         read by                      splits
    a file, or a glob of files           files.py, through datasets   eval_fraction held out by the seed
    a save_to_disk directory             load_from_disk               a Dataset: held out; a DatasetDict: by name
    any other directory (a repository)   load_dataset(dir, subset)    by name (train_split / eval_split)
    a hub id                             load_dataset(id, subset)     by name

With eval_split null, a directory's own held-out split (validation, else test: a test*.jsonl beside the
train file) is the eval split; only a source without one has eval_fraction held out. A directory is read
whole or refused (check_directory_read_whole). dataset.path with the arith preset is refused
(check_path_is_read): the user named data, and arith would not read it.

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

from prefopt.core.errors import ConfigError
from prefopt.data.arith import OnPolicyCounts, generate_arith_rows
from prefopt.data.errors import DataError
from prefopt.data.files import BUILDERS, SUPPORTED, data_files, read_data_files
from prefopt.data.hub import hub_offline_mode, is_saved_dataset, load_named_split, load_saved, saved_split


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
    onpolicy: Optional[dict[str, OnPolicyCounts]] = None  # arith onpolicy: what became of each split's questions


def check_path_is_read(dataset_cfg: DictConfig) -> None:
    """dataset.path names the data whatever the preset, or the run is refused: the arith preset generates its
    pairs and would ignore a path, so a path given with it (`prefopt train dataset.path=x.jsonl`, arith being
    the default) is an error that says to choose dataset=local, not a run on the arithmetic pairs. Switching
    to local data silently was the other choice; it was not taken because the arith preset's other settings
    (format, lengths, eval split) were written for generated data, not for the user's file."""
    if dataset_cfg.name == "arith" and dataset_cfg.get("path"):
        raise ConfigError(
            f"dataset.path={dataset_cfg.path} is set, but dataset=arith (the default) generates its pairs and reads no "
            f"file; to train on it, choose local data: prefopt train dataset=local dataset.path={dataset_cfg.path} "
            f"(or dataset=hh_rlhf / dataset=ultrafeedback for data in their schema)"
        )


def load_raw_splits(dataset_cfg: DictConfig, seed: int, samples: Optional[Sequence[Sequence[str]]] = None) -> RawSource:
    """samples: the model's samples per arith question (rejected_style=onpolicy, train/onpolicy.py)."""
    check_path_is_read(dataset_cfg)
    if dataset_cfg.name == "arith":
        train_rows, eval_rows, counts = generate_arith_rows(dataset_cfg.arith, seed, samples)
        origin = f"arith generator (seed {seed}{', on-policy' if counts else ''})"
        return RawSource(
            RawSplit(f"{origin} train", train_rows, list(range(len(train_rows)))),
            RawSplit(f"{origin} eval", eval_rows, list(range(len(eval_rows)))),
            onpolicy=counts or None,
        )
    if not dataset_cfg.path:
        raise ConfigError(
            f"dataset.path is empty for dataset.name={dataset_cfg.name}: give a local file "
            f"(dataset.path=/path/to/file.jsonl; {SUPPORTED}), a glob, a directory or a hub id"
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
        path
        for path in directory.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )
    if is_saved_dataset(directory):
        import datasets

        saved = load_saved(directory)
        origin = f"saved dataset {directory}"
        if not isinstance(saved, datasets.DatasetDict):  # a Dataset: one split
            train, held_out = hold_out(origin, saved, dataset_cfg.eval_fraction, seed)
            return RawSource(train, held_out, files=files)
        train, held_out = named_splits(
            origin, lambda split: saved_split(saved, split, origin), dataset_cfg, seed, list(saved)
        )
        return RawSource(train, held_out, files=files)
    origin = f"dataset directory {directory}" + (f" ({dataset_cfg.subset})" if dataset_cfg.subset else "")

    def load(split: str):
        return load_named_split(str(directory), dataset_cfg.subset, dataset_cfg.data_dir, split, local=True)

    split_files = directory_split_files(directory, dataset_cfg)
    if split_files is not None:
        check_directory_read_whole(directory, dataset_cfg, files, split_files)
    train, held_out = named_splits(origin, load, dataset_cfg, seed, list(split_files or ()))
    return RawSource(train, held_out, files=files)


def directory_split_files(directory: Path, dataset_cfg: DictConfig) -> Optional[dict[str, list[Path]]]:
    """Split name -> the data files `datasets` reads for it from a directory of data files (it infers the splits
    from file names: train*, test*, validation* / valid* / dev*); None where it cannot say (a loading script,
    a repository that names its own configs): then load_dataset reports what is wrong."""
    import datasets

    try:
        with hub_offline_mode(True):
            builder = datasets.load_dataset_builder(str(directory), dataset_cfg.subset, data_dir=dataset_cfg.data_dir)
    except Exception:  # load_named_split raises the error worth showing
        return None
    data_files = getattr(builder.config, "data_files", None)
    if not data_files:
        return None
    return {str(split): [Path(str(file)) for file in split_files] for split, split_files in data_files.items()}


def check_directory_read_whole(
    directory: Path, dataset_cfg: DictConfig, files: list[Path], split_files: dict[str, list[Path]]
) -> None:
    """A directory is read whole or refused: `datasets` reads the files of one format only (the most common) and,
    once some files are named for a split, only those; any other data file would be left out without a word."""
    readme = directory / "README.md"
    if dataset_cfg.subset or (readme.is_file() and "configs:" in readme.read_text(errors="replace")):
        return  # the repository says which files make which config: files of other configs are not this one's
    from datasets.data_files import FILES_TO_IGNORE  # metadata files (dataset_info.json, ...) that are never data

    read = {os.path.realpath(file) for split in split_files.values() for file in split}
    under = directory / dataset_cfg.data_dir if dataset_cfg.data_dir else directory
    left_out = [
        file
        for file in files
        if file.suffix in BUILDERS
        and file.is_relative_to(under)
        and file.name not in FILES_TO_IGNORE
        and not any(part.startswith("__") for part in file.relative_to(directory).parts)
        and os.path.realpath(file) not in read
    ]
    if left_out:
        kinds = sorted({file.suffix for file in files if file.suffix in BUILDERS})
        named = ", ".join(str(file.relative_to(directory)) for file in left_out[:3])
        named += f" and {len(left_out) - 3} more" if len(left_out) > 3 else ""
        why = (
            f"it holds files of several formats ({', '.join(kinds)}) and `datasets` reads one format per directory"
            if len(kinds) > 1
            else "their names name no split (train*, test*, validation*) while other files' do"
        )
        raise DataError(
            f"dataset directory {directory}: {named} would not be read: {why}. Give dataset.path one file or a glob "
            "of files of one format, convert the files to one format, or move the files that are not data out of the "
            "directory"
        )


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


EVAL_SPLIT_NAMES = (
    "validation",
    "test",
)  # a source's own held-out split, used when dataset.eval_split=null, in this order


def named_splits(
    origin: str, load: Callable[[str], Sequence[Any]], dataset_cfg: DictConfig, seed: int, available: Sequence[str] = ()
) -> tuple[RawSplit, RawSplit]:
    """train_split and eval_split by name. With eval_split null, a held-out split the source has (validation,
    else test: `available`) is the eval split, said in its origin (the data line names it); without one,
    eval_fraction of train_split is held out."""
    train_rows = load(dataset_cfg.train_split)
    eval_split = dataset_cfg.eval_split
    if eval_split is None:
        eval_split = next(
            (name for name in EVAL_SPLIT_NAMES if name in available and name != dataset_cfg.train_split), None
        )
        if eval_split is None:
            return hold_out(f"{origin} split {dataset_cfg.train_split}", train_rows, dataset_cfg.eval_fraction, seed)
        origin_of_eval = f"{origin} split {eval_split} (its own held-out split, as dataset.eval_split=null found it)"
        eval_rows = load(eval_split)
        return (
            RawSplit(f"{origin} split {dataset_cfg.train_split}", train_rows, list(range(len(train_rows)))),
            RawSplit(origin_of_eval, eval_rows, list(range(len(eval_rows)))),
        )
    eval_rows = load(eval_split)
    return (
        RawSplit(f"{origin} split {dataset_cfg.train_split}", train_rows, list(range(len(train_rows)))),
        RawSplit(f"{origin} split {eval_split}", eval_rows, list(range(len(eval_rows)))),
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
