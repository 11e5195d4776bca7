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
import pyarrow.parquet as pq

from firehosed.formats.table import envelope_columns, mapped_rows
from firehosed.mapping import Mapping
from firehosed.record import Record

ENVELOPE_SCHEMA = pa.schema(
    [
        pa.field("type", pa.string(), nullable=False),
        pa.field("id", pa.string(), nullable=False),
        pa.field("session", pa.string()),
        pa.field("person", pa.string()),
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("signal", pa.string(), nullable=False),
    ]
)


def encode(records: Sequence[Record], mapping: Mapping | None, compression: str) -> bytes:
    """The Parquet file of a batch; `compression` is "snappy" or "zstd"."""
    table = _envelope_table(records) if mapping is None else _mapped_table(records, mapping)
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=max(1, table.num_rows), compression=compression)
    return out.getvalue()


def _envelope_table(records: Sequence[Record]) -> Any:
    columns = envelope_columns(records)
    fields = zip(columns, ENVELOPE_SCHEMA, strict=True)
    arrays = [pa.array(values, type=field.type) for values, field in fields]
    return pa.Table.from_arrays(arrays, schema=ENVELOPE_SCHEMA)


def _mapped_table(records: Sequence[Record], mapping: Mapping) -> Any:
    columns = list(zip(*mapped_rows(records, mapping), strict=True))
    arrays = [pa.array(values, type=pa.string()) for values in columns]
    return pa.Table.from_arrays(arrays, names=mapping.columns)
