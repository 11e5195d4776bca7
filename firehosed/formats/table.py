"""A batch as the columns of a typed file (avro, parquet): the mapping's, each a text
cell or null; or, without a mapping, the envelope's (`ENVELOPE`) and the signal as JSON
text, which a batch's Rows hold as columns already.

A mapped cell is what its CSV cell would be (a string itself, a number or boolean its
JSON text, an object or array its compact JSON), except that a missing path or a JSON
null is a null, not an empty string. The envelope's `time` is in whole microseconds
since the epoch, UTC.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import msgspec

from firehosed.formats.csv import cell
from firehosed.mapping import MISSING, Mapping
from firehosed.record import Record, Rows

ENVELOPE = ("type", "id", "session", "person", "time", "signal")


def mapped_rows(records: Sequence[Record], mapping: Mapping) -> Iterator[list[str | None]]:
    """Each record's mapped cells, in the mapping's column order."""
    decode = msgspec.json.decode
    for record in records:
        yield [_cell(value) for value in mapping.values(decode(record.raw))]


def _cell(value: object) -> str | None:
    return None if value is MISSING or value is None else cell(value)


def as_rows(records: Sequence[Record]) -> Rows:
    """The batch as columns (a cut's batch is Rows already)."""
    if isinstance(records, Rows):
        return records
    rows = Rows()
    for record in records:
        rows.append(record)
    return rows


def micros(seconds: float) -> int:
    """Unix seconds as whole microseconds (rounded half to even)."""
    return round(seconds * 1_000_000)
