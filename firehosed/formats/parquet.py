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
from firehosed.record import Packed, Record, Rows

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


# The table as built: the signals are string views of the batch's bytes (Arrow's
# `string_view`, written to Parquet as the same strings).
BUILT_SCHEMA = ENVELOPE_SCHEMA.set(
    ENVELOPE_SCHEMA.get_field_index("signal"),
    pa.field("signal", pa.string_view(), nullable=False),
)
# Dictionary encoding where values repeat; an id, a time or a signal is (nearly) unique,
# and trying a dictionary on it costs time for nothing. Statistics (min, max) of the
# signal's JSON text would serve no query. No Arrow schema is stored beside the file's
# own: it would name the built table's string views, and a reader given none reads the
# Parquet types as ENVELOPE_SCHEMA.
ENVELOPE_OPTIONS = {
    "use_dictionary": ["type", "session", "person"],
    "write_statistics": ["type", "id", "session", "person", "time"],
    "store_schema": False,
}
# Records: a span of fewer (a block of a small request) is joined with its neighbours
# into one chunk of the signal column, since each chunk costs a few calls into pyarrow.
SPAN = 256
# Bytes of joined column text split in one call (far below Arrow's 2 GiB per array).
SPLIT = 1 << 30
# Bytes: a string view of a value no longer than this holds the value itself.
INLINE = 12


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
    """The envelope columns, built by pyarrow from the batch as the cut holds it: the
    strings split from the blocks' packed heads, the times converted in one vectorised
    pass, the signals viewed where they lie."""
    rows = as_rows(records)
    packs = rows.packs()
    seconds = pa.chunked_array(
        [
            pa.Array.from_buffers(
                pa.float64(), len(packed), [None, pa.py_buffer(packed.native_times())]
            )[start:stop]
            for packed, start, stop in packs
        ],
        pa.float64(),
    )
    time = pc.round(pc.multiply(seconds, 1_000_000)).cast(pa.int64()).cast(TIME)
    arrays = [
        _strings(packs, "types"),
        _strings(packs, "ids"),
        _strings(packs, "sessions"),
        _strings(packs, "persons"),
        time,
        _signals(rows),
    ]
    return pa.Table.from_arrays(arrays, schema=BUILT_SCHEMA)


def _strings(packs: list[tuple[Packed, int, int]], name: str) -> Any:
    """Column `name` of the blocks' packed heads (with its marks of None): the
    joined texts of neighbouring blocks split by pyarrow in one call and sliced to the
    records the batch holds; a column held as a list (a value holds a newline) is
    converted as it is."""
    chunks: list[Any] = []
    texts = _Texts()
    for packed, start, stop in packs:
        column = getattr(packed, name)
        if isinstance(column, list) or texts.size + len(column) > SPLIT:
            chunks += texts.split()
            texts = _Texts()
        if isinstance(column, list):
            chunks.append(pa.array(column[start:stop], pa.string()))
        else:
            texts.add(column, packed.nulls(name), len(packed), start, stop)
    return pa.chunked_array(chunks + texts.split(), pa.string())


class _Texts:
    """Packed columns' texts gathered to be split in one call."""

    def __init__(self) -> None:
        self.texts: list[bytes] = []
        self.marks: list[tuple[bytes, int]] = []  # each block's marks of None, and count
        self.ranges: list[tuple[int, int]] = []  # the records held, in the values split
        self.count = 0
        self.size = 0

    def add(self, text: bytes, marks: bytes, count: int, start: int, stop: int) -> None:
        ranges = self.ranges
        if ranges and ranges[-1][1] == self.count + start:  # runs on from the last
            ranges[-1] = (ranges[-1][0], self.count + stop)
        else:
            ranges.append((self.count + start, self.count + stop))
        self.texts.append(text)
        self.marks.append((marks, count))
        self.count += count
        self.size += len(text) + 1

    def split(self) -> list[Any]:
        """The records held, as string arrays (none if nothing was added)."""
        if not self.texts:
            return []
        values = pc.split_pattern(pa.array([b"\n".join(self.texts)], pa.binary()), b"\n")
        values = values.values
        if len(values) != self.count:
            raise ValueError(f"packed column of {len(values)} values for {self.count} records")
        if any(marks for marks, _ in self.marks):
            flags = b"".join([marks or bytes(count) for marks, count in self.marks])
            null = pa.Array.from_buffers(pa.uint8(), self.count, [None, pa.py_buffer(flags)])
            values = pc.if_else(pc.equal(null, 0), values, pa.scalar(None, pa.binary()))
        strings = values.view(pa.string())
        return [strings.slice(start, stop - start) for start, stop in self.ranges]


def _signals(rows: Rows) -> Any:
    """The signals' column, made from the batch's bytes as the cut holds them: a block's
    records (views of the queue's segments, each followed by a newline) are read by
    offsets that count the newlines, then copied once without them; records read one by
    one are copied from their list. A queued record is valid UTF-8 (checked at ingest,
    or encoded by msgspec), so it is not checked again."""
    parts: list[tuple[memoryview | bytes, array[int]] | list[bytes]] = []
    texts: list[memoryview] = []  # blocks of few records, joined into one part
    sizes = array("I")
    for span in rows.spans():
        if isinstance(span, tuple) and len(span[1]) < SPAN:
            texts.append(span[0])
            sizes += span[1]
            if len(sizes) < SPAN:
                continue
        if texts:
            parts.append((b"".join(texts), sizes))
            texts, sizes = [], array("I")
        if isinstance(span, list) or len(span[1]) >= SPAN:
            parts.append(span)
    if texts:
        parts.append((b"".join(texts), sizes))
    return pa.chunked_array(_signal_chunks(parts), pa.string_view())


def _signal_chunks(parts: list[tuple[memoryview | bytes, array[int]] | list[bytes]]) -> list[Any]:
    """`_signals`' chunks, as string views. The offsets of every text part's lines
    (newlines counted) are summed in one pass; each part's lines are then viewed as
    they lie, each view one byte short of its newline, so no record is copied. A
    record of `INLINE` bytes or fewer would be held in its view: a batch with one has
    its newlines cut off by a copy instead."""
    sizes = array("I")
    for part in parts:
        if isinstance(part, tuple):
            sizes += part[1]
    lengths = pa.Array.from_buffers(pa.uint32(), len(sizes), [None, pa.py_buffer(sizes)])
    ends = pc.cumulative_sum(pc.add(lengths.cast(pa.int64()), 1))
    offsets = pa.concat_arrays([pa.array([0], pa.int64()), ends])
    in_place = len(sizes) > 0 and pc.min(lengths).as_py() > INLINE
    # Each view is four int32 words, the first its size: this takes one off each size.
    shorten = pa.Array.from_buffers(
        pa.int32(), 4 * len(sizes), [None, pa.py_buffer(array("i", (1, 0, 0, 0)) * len(sizes))]
    )
    chunks: list[Any] = []
    at = 0
    for part in parts:
        if isinstance(part, list):  # (pyarrow makes chunks of one over 2 GiB)
            binary = pa.array(part, pa.binary())
            pieces = binary.chunks if isinstance(binary, pa.ChunkedArray) else [binary]
            chunks += [piece.cast(pa.binary_view()).view(pa.string_view()) for piece in pieces]
            continue
        text, count = part[0], len(part[1])
        own = offsets.slice(at, count + 1)
        own = pc.subtract(own, own[0])
        at += count
        buffers = [None, own.buffers()[1], pa.py_buffer(text)]
        lines = pa.Array.from_buffers(pa.large_binary(), count, buffers)
        if not in_place:
            chunks.append(
                pc.binary_slice(lines, 0, -1).cast(pa.binary_view()).view(pa.string_view())
            )
            continue
        views = lines.cast(pa.binary_view()).buffers()  # [validity, views, data...]
        words = pa.Array.from_buffers(pa.int32(), 4 * count, [None, views[1]])
        words = pc.subtract(words, shorten.slice(0, 4 * count))
        viewed = [None, words.buffers()[1], *views[2:]]
        chunks.append(pa.Array.from_buffers(pa.string_view(), count, viewed))
    return chunks


def _mapped_table(records: Sequence[Record], mapping: Mapping) -> Any:
    columns = list(zip(*mapped_rows(records, mapping), strict=True))
    arrays = [pa.array(values, type=pa.string()) for values in columns]
    return pa.Table.from_arrays(arrays, names=mapping.columns)
