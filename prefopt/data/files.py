"""Local data files: one file, or every file a glob matches (.json, .jsonl, .csv, .parquet), read through `datasets`.

`datasets` converts the files to Arrow once and keeps that in its cache (HF_DATASETS_CACHE), so later
runs (every job of a sweep) memory-map it instead of parsing the files again. JSON that `datasets`
cannot read as one table (a line that is not JSON or not UTF-8, a row that is not an object) is read
by prefopt's own parser instead, which keeps each unreadable line in place as an `UnreadableRow`, a bad
row like any other: dataset.on_bad_row decides whether it stops the run (naming its line) or is
skipped and counted.

Messages point at a row the way an editor counts, from 1: "line 8" is the 8th line of a JSON-lines
file; "row 3" is the 3rd row of a JSON list, a CSV or a parquet file; with several files the file is
named too ("b.jsonl, line 8"). Rows read by `datasets` get their positions only when a message needs
one: the files are scanned then, not on every run.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from prefopt.core.fileutil import file_identity
from prefopt.data.errors import DataError
from prefopt.data.hub import hub_offline_mode

logger = logging.getLogger("prefopt.data")

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}  # suffix -> `datasets` builder
SUPPORTED = ".json, .jsonl, .csv or .parquet"
UTF8_BOM = "\ufeff"  # some editors start UTF-8 files with it; JSON parsers refuse it
TOO_DEEP = "nested too deeply to read (JSON arrays or objects nested about 1000 levels or more); flatten or remove it"


@dataclass(frozen=True)
class UnreadableRow:
    """A line of a JSON-lines file that is not UTF-8 or not JSON, kept in place as a bad row (module docstring)."""

    problem: str  # what is wrong and how to fix it


@dataclass
class FileRows:
    rows: Sequence[Any]  # a datasets.Dataset, or a list (JSON read by prefopt's parser): both index by position
    positions: Sequence[str]  # each row's position as users count it ("line 8", "b.jsonl, row 3")


def data_files(path: str) -> list[Path]:
    """The files dataset.path names: one file, or every file a glob matches (sorted, so the order is stable)."""
    if glob.has_magic(path):
        files = glob_files(path)
        if not files:
            raise DataError(
                f"dataset.path={path} matches no file; check the pattern (e.g. dataset.path='/data/train-*.jsonl')"
            )
    elif os.path.isfile(path):
        files = [Path(path)]
    else:
        raise DataError(
            f"dataset.path={path} does not exist (or is not a file); give an existing {SUPPORTED} file, a glob of "
            "them, or a directory (a save_to_disk dataset or a dataset repository)"
        )
    unsupported = [str(file) for file in files if file.suffix not in BUILDERS]
    if unsupported:
        raise DataError(
            f"dataset.path={path}: unsupported file type ({', '.join(unsupported[:3])}); use {SUPPORTED} files"
        )
    kinds = sorted({BUILDERS[file.suffix] for file in files})
    if len(kinds) > 1:
        raise DataError(
            f"dataset.path={path} matches files of different types ({', '.join(kinds)}); give one type per dataset"
        )
    return files


def glob_files(pattern: str) -> list[Path]:
    """The files a glob matches, each file once (sorted). Two matches that resolve to one file (a symlink, a
    directory linked twice) are one file: the match with the fewest directories names it. A `**` pattern is
    walked here, not by glob.glob, which follows a symlink cycle until the path is too long for the system
    (~40 times round, each time matching the same files again) and, with two cycles, far longer."""
    matches = (
        walk_glob(pattern) if "**" in pattern else [match for match in glob.glob(pattern) if os.path.isfile(match)]
    )
    chosen: dict[str, str] = {}  # real path -> the match that names it
    for match in sorted(matches, key=lambda match: (match.count(os.sep), match)):
        chosen.setdefault(os.path.realpath(match), match)
    if len(chosen) < len(matches):
        logger.info(
            "dataset.path=%s: %d matches are %d files (symlinks); each file is read once",
            pattern,
            len(matches),
            len(chosen),
        )
    return sorted(Path(match) for match in chosen.values())


def walk_glob(pattern: str) -> list[str]:
    """Files matching a pattern with `**` (any number of directories, hidden ones aside, as glob.glob counts
    them), walked once per real directory: a symlink back to a directory already walked is not entered."""
    parts = pattern.split(os.sep)
    fixed = next(number for number, part in enumerate(parts) if glob.has_magic(part))
    root = os.sep.join(parts[:fixed]) or (os.sep if pattern.startswith(os.sep) else ".")
    wanted = parts[fixed:]
    matches, walked = [], set()
    for directory, subdirectories, names in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in walked:  # reached again through a symlink: a cycle, or a second name for it
            subdirectories[:] = []
            continue
        walked.add(real)
        # hidden ones aside; real directories before symlinks, so a file is named by its real path where it can be
        subdirectories[:] = sorted(
            (name for name in subdirectories if not name.startswith(".")),
            key=lambda name: (os.path.islink(os.path.join(directory, name)), name),
        )
        relative = os.path.relpath(directory, root)
        base = [] if relative == "." else relative.split(os.sep)
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and components_match(base + [name], wanted):
                matches.append(path if root != "." else os.path.relpath(path))  # as glob.glob names them
    return matches


def components_match(names: list[str], pattern: list[str]) -> bool:
    """Whether path components match pattern components, `**` standing for any number of them."""
    if not pattern:
        return not names
    if pattern[0] == "**":
        return any(components_match(names[skip:], pattern[1:]) for skip in range(len(names) + 1))
    if not names or (names[0].startswith(".") and not pattern[0].startswith(".")):
        return False
    return fnmatch.fnmatchcase(names[0], pattern[0]) and components_match(names[1:], pattern[1:])


def read_data_files(files: list[Path], label: str) -> FileRows:
    """All rows of the files, in file order, through `datasets` (module docstring)."""
    builder = BUILDERS[files[0].suffix]
    try:
        rows = load_with_datasets(builder, files)
        positions: Sequence[str] = LazyPositions(files, len(rows))
    except Exception as error:  # datasets raises its own build errors, ArrowInvalid, UnicodeDecodeError, ...
        if builder != "json":
            raise DataError(f"{label} is not a readable {builder} file: {error}") from None
        logger.info("%s: datasets cannot read it as a table (%s); reading it row by row", label, str(error)[:200])
        rows, positions = parse_json_files(files)
    if not len(rows):
        raise DataError(f"{label} has no rows")
    return FileRows(rows, positions)


def load_with_datasets(builder: str, files: list[Path]):
    import datasets

    options = {}
    if builder == "csv":  # every column stays text ("007" is not 7, "NA" is not null); only empty cells are null
        options = dict(features=csv_text_features(files[0]), keep_default_na=False, na_values=[""])
    with hub_offline_mode(True):  # local files need no network
        # `datasets` keys its Arrow copy of local files on their paths and mtimes only, so an edit with the mtime
        # restored (cp -p, rsync -a) would read the old copy: the config name carries the files' identities too
        identities = hashlib.sha256("|".join(file_identity(file) for file in files).encode()).hexdigest()[:16]
        rows = datasets.load_dataset(
            builder, f"prefopt-{identities}", data_files=[str(file) for file in files], split="train", **options
        )
    if builder == "json":  # pyarrow's JSON reader lets bytes that are not UTF-8 through: such a file goes to our parser
        rows.data.table.validate(full=True)
    return rows


def csv_text_features(path: Path):
    import datasets

    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a leading BOM is not part of the first name
        header = next(csv.reader(handle), None)
    if not header:
        raise DataError(
            f"file {path} has no header line; a CSV file starts with the column names (prompt,chosen,rejected)"
        )
    return datasets.Features({name: datasets.Value("string") for name in header})


class LazyPositions(Sequence[str]):
    """Row positions computed on first use (only a message about a row needs one)."""

    def __init__(self, files: list[Path], total: int):
        self.files, self.total, self.positions = files, total, None

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index):
        if self.positions is None:
            per_file = [positions_in_file(file) for file in self.files]
            if (
                sum(len(positions) for positions in per_file) != self.total
            ):  # the scan disagrees with `datasets`: count rows
                self.positions = [f"row {number}" for number in range(1, self.total + 1)]
            else:
                self.positions = labelled_positions(self.files, per_file)
        return self.positions[index]


def labelled_positions(files: list[Path], per_file: list[list[str]]) -> list[str]:
    """One file's positions as they are; several files' with the file name in front."""
    if len(files) == 1:
        return per_file[0]
    return [f"{file.name}, {position}" for file, positions in zip(files, per_file) for position in positions]


def positions_in_file(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return counted(pyarrow.parquet.ParquetFile(path).metadata.num_rows)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as handle:
            return counted(sum(1 for record in csv.reader(handle) if record) - 1)  # less the header
    data = path.read_bytes()
    if path.suffix == ".jsonl" or not data.decode("utf-8", errors="replace").lstrip(UTF8_BOM + " \t\r\n").startswith(
        "["
    ):
        return [f"line {number}" for number, line in enumerate(data.split(b"\n"), start=1) if line.strip()]
    return counted(len(json.loads(data.decode("utf-8").removeprefix(UTF8_BOM))))


def counted(count: int) -> list[str]:
    return [f"row {number}" for number in range(1, count + 1)]


def parse_json_files(files: list[Path]) -> tuple[list, list[str]]:
    """Every file's rows by prefopt's own parser, and their positions."""
    rows, per_file = [], []
    for path in files:
        file_rows, line_numbers = parse_json_rows(str(path), path.read_bytes())
        rows.extend(file_rows)
        per_file.append(
            [f"line {number}" for number in line_numbers] if line_numbers is not None else counted(len(file_rows))
        )
    return rows, labelled_positions(files, per_file)


def parse_json_rows(path: str, data: bytes) -> tuple[list, Optional[list[int]]]:
    """The rows, and each row's file line where the file is JSON lines (None: rows are counted)."""
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
    except RecursionError:
        if text.lstrip().startswith("["):
            raise DataError(
                f"file {path}: {TOO_DEEP}; as JSON lines (one row per line) such a row is a bad row that "
                f"dataset.on_bad_row=skip skips"
            ) from None
        return None  # JSON lines, one of them too deep: parsed line by line
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
    except RecursionError:  # Python's parser gives up on deeply nested values: a bad row, not a crash
        return UnreadableRow(TOO_DEEP)


def not_utf8_problem(path: str, byte: int, offset: int) -> str:
    fixed = "utf8" + os.path.splitext(path)[1]
    return (
        f"not UTF-8 text (byte 0x{byte:02x} at byte offset {offset} of the file); re-encode the file as UTF-8 "
        f"(from latin-1: iconv -f latin1 -t utf-8 {path} > {fixed})"
    )
