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
from array import array
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from firehosed.formats.table import as_rows, mapped_rows
from firehosed.mapping import Mapping
from firehosed.record import Record, Rows

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
# Records: a span of fewer (a block of a small request) is joined with its neighbours
# into one chunk of the signal column, since each chunk costs a few calls into pyarrow.
SPAN = 256


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
    signals = _signals(rows)
    arrays = [
        pa.array(rows.types, pa.string()),
        pa.array(rows.ids, pa.string()),
        pa.array(rows.sessions, pa.string()),
        pa.array(rows.persons, pa.string()),
        time,
        signals,
    ]
    return pa.Table.from_arrays(arrays, schema=ENVELOPE_SCHEMA)


def _signals(rows: Rows) -> Any:
    """The signals' column, made from the batch's bytes as the cut holds them: a block's
    records (views of the queue's segments, each followed by a newline) are read by
    offsets that count the newlines, then copied once without them; records read one by
    one are copied from their list. A queued record is valid UTF-8 (checked at ingest,
    or encoded by msgspec), so it is not checked again."""
    chunks: list[Any] = []
    texts: list[memoryview] = []  # blocks of few records, joined into one chunk
    sizes = array("I")
    for span in rows.spans():
        if isinstance(span, tuple) and len(span[1]) < SPAN:
            texts.append(span[0])
            sizes += span[1]
            if len(sizes) < SPAN:
                continue
        if texts:
            chunks.append(_chunk(b"".join(texts), sizes))
            texts, sizes = [], array("I")
        if isinstance(span, list):  # (pyarrow makes chunks of one over 2 GiB)
            binary = pa.array(span, pa.binary())
            parts = binary.chunks if isinstance(binary, pa.ChunkedArray) else [binary]
            chunks += [part.view(pa.string()) for part in parts]
        elif len(span[1]) >= SPAN:
            chunks.append(_chunk(*span))
    if texts:
        chunks.append(_chunk(b"".join(texts), sizes))
    return pa.chunked_array(chunks, pa.string())


def _chunk(text: memoryview | bytes, sizes: array[int]) -> Any:
    """Records of `sizes` bytes, each followed by a newline in `text`, as strings."""
    count = len(sizes)
    lengths = pa.Array.from_buffers(pa.uint32(), count, [None, pa.py_buffer(sizes)])
    ends = pc.cumulative_sum(pc.add(lengths.cast(pa.int64()), 1))
    offsets = pa.concat_arrays([pa.array([0], pa.int64()), ends])
    lines = pa.Array.from_buffers(
        pa.large_binary(), count, [None, offsets.buffers()[1], pa.py_buffer(text)]
    )
    return pc.binary_slice(lines, 0, -1).cast(pa.binary()).view(pa.string())


def _mapped_table(records: Sequence[Record], mapping: Mapping) -> Any:
    columns = list(zip(*mapped_rows(records, mapping), strict=True))
    arrays = [pa.array(values, type=pa.string()) for values in columns]
    return pa.Table.from_arrays(arrays, names=mapping.columns)
