"""The error types of the data pipeline: DataError (shown to the user) and BadRow (one malformed row)."""

from __future__ import annotations

from prefopt.core.errors import DataError  # the one error type of the data pipeline, defined with the others

BAD_ROW_HINT = "fix or remove the row, or set dataset.on_bad_row=skip to skip malformed rows"


class BadRow(Exception):
    """A malformed row; the caller turns it into a DataError naming the source, or skips it."""


def bad_row_error(where: str, problem: str) -> DataError:
    """where: the source and the row's position, as RawSplit.where gives it ("file x.jsonl (train part), line 8")."""
    return DataError(f"{where}: {problem}; {BAD_ROW_HINT}")
