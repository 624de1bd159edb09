"""The one error type of the data pipeline."""
from __future__ import annotations

BAD_ROW_HINT = "fix or remove the row, or set dataset.on_bad_row=skip to skip malformed rows"


from prefopt.errors import DataError  # noqa: F401  (the one error type of the data pipeline, defined with the others)


def bad_row_error(where: str, problem: str) -> DataError:
    """where: the source and the row's position, as RawSplit.where gives it ("file x.jsonl (train part), line 8")."""
    return DataError(f"{where}: {problem}; {BAD_ROW_HINT}")
