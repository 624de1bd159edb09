"""The one error type of the data pipeline."""
from __future__ import annotations

BAD_ROW_HINT = "fix or remove the row, or set dataset.on_bad_row=skip to skip malformed rows"


class DataError(ValueError):
    """Data that cannot be used. The message names the file (or hub dataset and split), the row when
    there is one, the problem and how to fix it."""


def bad_row_error(where: str, problem: str) -> DataError:
    """where: the source and the row's position, as RawSplit.where gives it ("file x.jsonl (train part), line 8")."""
    return DataError(f"{where}: {problem}; {BAD_ROW_HINT}")
