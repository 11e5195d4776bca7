"""`parquet`: one Parquet file per batch, one row group (a batch is at most `max_file`).

Columns: the mapping's, in order, each a nullable string (formats/table.py says what a
cell holds); or, without a mapping, `type` and `id` strings, `session` and `person`
nullable strings, `time` a timestamp in microseconds, UTC, and `signal` the record's
JSON as received. Compressed with snappy (default) or zstd.

pyarrow writes no time or random value in a file: a batch encoded again is the same
bytes (for the same pyarrow version, which the file names in `created_by`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from firehosed.formats.table import as_rows, mapped_rows
from firehosed.mapping import Mapping
from firehosed.record import Record

TIME = pa.timestamp("us", tz="UTC")
ENVELOPE_SCHEMA = pa.schema(
    [
        pa.field("type", pa.string(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("session", pa.string()),
        pa.field("person", pa.string()),
        pa.field("time", TIME, nullable=False),
        pa.field("signal", pa.string(), nullable=False),
    ]
)


# Dictionary encoding where values repeat; an id, a time or a signal is (nearly) unique,
# and trying a dictionary on it costs time for nothing. Statistics (min, max) of the
# signal's JSON text would serve no query.
ENVELOPE_OPTIONS = {
    "use_dictionary": ["type", "session", "person"],
    "write_statistics": ["type", "id", "session", "person", "time"],
}


def encode(records: Sequence[Record], mapping: Mapping | None, compression: str) -> bytes:
    """The Parquet file of a batch; `compression` is "snappy" or "zstd"."""
    out = io.BytesIO()
    if mapping is None:
        table, options = _envelope_table(records), ENVELOPE_OPTIONS
    else:
        table, options = _mapped_table(records, mapping), {}
    rows = max(1, table.num_rows)
    pq.write_table(table, out, row_group_size=rows, compression=compression, **options)
    return out.getvalue()


def _envelope_table(records: Sequence[Record]) -> Any:
    """The envelope columns, built by pyarrow from the batch's columns: the times
    converted in one vectorised pass, the signals' bytes copied once."""
    rows = as_rows(records)
    seconds = pa.array(rows.times, pa.float64())
    time = pc.round(pc.multiply(seconds, 1_000_000)).cast(pa.int64()).cast(TIME)
    signals = _text(pa.array(rows.raws, pa.binary()))
    arrays = [
        pa.array(rows.types, pa.string()),
        pa.array(rows.ids, pa.string()),
        pa.array(rows.sessions, pa.string()),
        pa.array(rows.persons, pa.string()),
        time,
        signals,
    ]
    return pa.Table.from_arrays(arrays, schema=ENVELOPE_SCHEMA)


def _text(binary: Any) -> Any:
    """The signals' bytes as text. A queued record is valid UTF-8 (checked at ingest, or
    encoded by msgspec), so one array is viewed, not checked again; pyarrow makes
    chunks of a batch over 2 GiB, which are cast."""
    if isinstance(binary, pa.ChunkedArray):
        return binary.cast(pa.string())
    return binary.view(pa.string())


def _mapped_table(records: Sequence[Record], mapping: Mapping) -> Any:
    columns = list(zip(*mapped_rows(records, mapping), strict=True))
    arrays = [pa.array(values, type=pa.string()) for values in columns]
    return pa.Table.from_arrays(arrays, names=mapping.columns)
