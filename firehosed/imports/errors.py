"""The two faults of reading an import file, kept apart because a run treats them apart:
a `RowError` is one row that cannot be imported (it is listed, the file goes on at the
next row); a `FileError` is a file that cannot be read at all (the run fails with it).
Every reader (rows.py, avro.py) reports in these terms."""

from __future__ import annotations

from dataclasses import dataclass


class FileError(Exception):
    """The whole file cannot be read (the run fails with this reason): empty file (no
    header), not a JSON array, truncated gzip, a CSV quote never closed, no Avro header..."""


@dataclass(frozen=True, slots=True)
class RowError:
    """One row that cannot be imported; the file goes on at the next row."""

    row: int  # 1-based data row number (a CSV header is not a row)
    column: str  # the column at fault, "" when the row as a whole is
    reason: str  # short, specific, for a person
