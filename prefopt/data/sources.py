"""Where rows come from: the arith generator, a local .json/.jsonl/.parquet file, or a hub dataset.

Every source gives two `RawSplit`s (train, eval) of untouched rows; formats.py makes sense of them.
A source with a single split (a local file, or eval_split=null) holds out eval_fraction of its rows,
chosen by the seed.

Messages point at a row the way an editor counts, from 1: "line 8" is the 8th line of a JSON-lines
file; "row 3" is the 3rd row of a JSON list, a parquet file, a hub split or the generator. A JSON line
that cannot be read (not UTF-8, not JSON) stays in place as an `UnreadableRow`, a bad row like any
other: dataset.on_bad_row decides whether it stops the run (naming its line) or is skipped and counted.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from omegaconf import DictConfig

from prefopt.errors import ConfigError
from prefopt.data.arith import generate_arith_rows
from prefopt.data.errors import DataError

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
UTF8_BOM = "\ufeff"  # some editors start UTF-8 files with it; JSON parsers refuse it


@dataclass
class RawSplit:
    origin: str  # "file /x/pairs.jsonl" or "hub dataset Anthropic/hh-rlhf (helpful-base) split train": starts every error
    rows: Sequence[Any]  # all rows of the source (a list, or a datasets.Dataset: both index by position)
    indices: list[int]  # positions of this split's rows in `rows` (0-based, the pairs' source_index), in source order
    line_numbers: Optional[Sequence[int]] = None  # the file line of each row of `rows` (JSON lines); None: rows are counted

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for index in self.indices:
            yield index, self.rows[index]

    def position(self, index: int) -> str:
        """The row at `index` of `rows` as users count it (module docstring): "line 8" or "row 3"."""
        if self.line_numbers is not None:
            return f"line {self.line_numbers[index]}"
        return f"row {index + 1}"

    def where(self, index: int) -> str:
        """Origin and position, which start every message about one row."""
        return f"{self.origin}, {self.position(index)}"


@dataclass(frozen=True)
class UnreadableRow:
    """A line of a JSON-lines file that is not UTF-8 or not JSON, kept in place as a bad row (module docstring)."""

    problem: str  # what is wrong and how to fix it


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
        rows, line_numbers = read_local_file(path)
        return hold_out(f"file {path}", rows, dataset_cfg.eval_fraction, seed, line_numbers)
    return load_hub_splits(dataset_cfg, seed)


def looks_like_local_path(path: str) -> bool:
    """A missing local file must be reported as missing, not looked up on the hub."""
    return path.startswith((".", "/", "~")) or path.endswith(LOCAL_SUFFIXES)


def read_local_file(path: str) -> tuple[list, Optional[list[int]]]:
    """All rows of a .json (a list of objects, or JSON lines), .jsonl or .parquet file, read offline, and
    each row's file line where the file is JSON lines (None otherwise: rows are then counted)."""
    if not os.path.isfile(path):
        raise DataError(f"dataset.path={path} does not exist (or is not a file); give an existing .json, .jsonl or .parquet file")
    if not path.endswith(LOCAL_SUFFIXES):
        raise DataError(f"dataset.path={path}: unsupported file type; use a .json, .jsonl or .parquet file")
    if path.endswith(".parquet"):
        import pyarrow.parquet

        try:
            rows, line_numbers = pyarrow.parquet.read_table(path).to_pylist(), None
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise DataError(f"file {path} is not a readable parquet file: {error}") from None
    else:
        with open(path, "rb") as handle:
            data = handle.read()
        rows, line_numbers = parse_json_rows(path, data)
    if not rows:
        raise DataError(f"file {path} has no rows")
    return rows, line_numbers


def parse_json_rows(path: str, data: bytes) -> tuple[list, Optional[list[int]]]:
    # A .json file may hold JSON lines (as `datasets` accepts), so try one document first, then lines.
    if not path.endswith(".jsonl"):
        document = parse_json_document(path, data)
        if document is not None:
            return document, None
    return parse_json_lines(path, data)


def parse_json_document(path: str, data: bytes) -> Optional[list]:
    """The rows of a file holding one JSON list; None if the file is not one JSON document."""
    try:
        text = data.decode("utf-8").removeprefix(UTF8_BOM)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"file {path}, line {line}: {not_utf8_problem(path, data[error.start], error.start)}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):  # meant as one list of rows: its own error says where it breaks
            raise DataError(
                f"file {path}, line {error.lineno}: not valid JSON ({error.msg} at column {error.colno}); fix the file "
                f"(a .json file holds one list of row objects, or JSON lines)"
            ) from None
        return None
    if isinstance(document, dict):  # a single JSON-lines row, or an object that is not a row list
        document = [document] if len(text.strip().splitlines()) == 1 else None
    if not isinstance(document, list):
        raise DataError(f"file {path} must hold a list of objects (one per row) or JSON lines (one object per line)")
    return document


def parse_json_lines(path: str, data: bytes) -> tuple[list, list[int]]:
    """One row per non-blank line, and its line number. Lines are split on "\\n" bytes, as editors count them."""
    rows, line_numbers = [], []
    offset = 0  # of the line's first byte in the file
    for line_number, raw_line in enumerate(data.split(b"\n"), start=1):
        if raw_line.strip():
            rows.append(parse_json_line(path, raw_line, offset, first=line_number == 1))
            line_numbers.append(line_number)
        offset += len(raw_line) + 1
    return rows, line_numbers


def parse_json_line(path: str, raw_line: bytes, offset: int, first: bool) -> Any:
    """The line's JSON value, or an UnreadableRow saying why there is none."""
    try:
        text = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        return UnreadableRow(not_utf8_problem(path, raw_line[error.start], offset + error.start))
    try:
        return json.loads(text.removeprefix(UTF8_BOM) if first else text)
    except json.JSONDecodeError as error:
        return UnreadableRow(f"not valid JSON ({error.msg} at column {error.colno})")


def not_utf8_problem(path: str, byte: int, offset: int) -> str:
    fixed = "utf8" + os.path.splitext(path)[1]
    return (
        f"not UTF-8 text (byte 0x{byte:02x} at byte offset {offset} of the file); re-encode the file as UTF-8 "
        f"(from latin-1: iconv -f latin1 -t utf-8 {path} > {fixed})"
    )


def hold_out(
    origin: str, rows: Sequence[Any], eval_fraction: float, seed: int, line_numbers: Optional[Sequence[int]] = None
) -> tuple[RawSplit, RawSplit]:
    """Split one source into train and eval by the seed; both keep source order."""
    total = len(rows)
    eval_count = round(total * eval_fraction)
    if eval_fraction > 0 and total >= 2:
        eval_count = min(max(eval_count, 1), total - 1)  # both splits keep at least one row
    eval_indices = set(random.Random(seed).sample(range(total), eval_count))
    train = [index for index in range(total) if index not in eval_indices]
    return (
        RawSplit(f"{origin} (train part)", rows, train, line_numbers),
        RawSplit(f"{origin} (held-out part)", rows, sorted(eval_indices), line_numbers),
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
