"""A batch as the columns of a typed file (avro, parquet): the mapping's, each a text
cell or null; or, without a mapping, the envelope's and the signal as JSON text.

A mapped cell is what its CSV cell would be (a string itself, a number or boolean its
JSON text, an object or array its compact JSON), except that a missing path or a JSON
null is a null, not an empty string. The envelope's `time` is in whole microseconds
since the epoch, UTC.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

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


class Envelope(NamedTuple):
    """The ENVELOPE columns of a batch, in order."""

    types: list[str]
    ids: list[str]
    sessions: list[str | None]
    persons: list[str | None]
    times: list[int]  # microseconds since the epoch, UTC
    signals: list[bytes]  # each record's JSON, as received (UTF-8)


def envelope_columns(records: Sequence[Record]) -> Envelope:
    """The batch's envelope columns (Rows hold them as columns already)."""
    rows = records if isinstance(records, Rows) else _rows(records)
    times = [round(moment * 1_000_000) for moment in rows.times]
    return Envelope(rows.types, rows.ids, rows.sessions, rows.persons, times, rows.raws)


def _rows(records: Sequence[Record]) -> Rows:
    rows = Rows()
    for record in records:
        rows.append(record)
    return rows
