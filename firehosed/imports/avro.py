"""Read an Avro object container file into import rows (format "avro").

The file is read block by block with fastavro, the writer's schema taken from its
header: memory holds one block and its records. Each record becomes a row as a CSV row
would be, so that `RowMaker` and the task's `columns` treat both alike: a nested record
or a map is flattened into dotted columns (`address.city`), which RowMaker nests again;
an array keeps its JSON form; a union is its value; null is an absent value; bytes and
fixed are base64; a date, time or timestamp is ISO 8601 (UTC with `Z` for a timestamp,
no offset for a local one); a uuid is its text; a decimal an exact JSON number.

A block that cannot be read (a bad sync marker, compressed data that does not inflate,
records that do not decode, the file cut short inside it) fails the rows it holds, each
a RowError naming the block's byte offset, and the file goes on at the next block. A
block whose framing is broken is skipped to the next sync marker; the rows it held are
counted as its header said when that is believable, else as one row.
"""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from datetime import date, datetime, time
from typing import IO, Any, Protocol, cast

import fastavro
import fastavro.read

from firehosed.imports.errors import FileError, RowError

Row = tuple[int, dict[str, Any]]

MAGIC = b"Obj\x01"
SYNC_SIZE = 16
# A block (compressed) larger than this is taken for corrupt framing: a sound writer cuts
# blocks of kilobytes (fastavro 16 KB, Java 64 KB), and a read of a corrupt length must
# not allocate gigabytes.
MAX_BLOCK = 64 << 20
MAX_BLOCK_ROWS = 10_000_000  # a corrupt block's row count past this is not believed
SCAN_CHUNK = 1 << 20  # bytes read at a time while looking for the next sync marker
# Field types whose values a row takes as they are (a record of only these is the
# record itself, its nulls left out).
PLAIN = frozenset({"null", "boolean", "int", "long", "float", "double", "string"})


class Seekable(Protocol):
    """What the reader needs of a file: a plain one, or a gzip one read through."""

    def read(self, size: int = -1, /) -> bytes: ...
    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def tell(self) -> int: ...


class _TooLarge(ValueError):
    """A read past MAX_BLOCK: a corrupt length, raised through fastavro."""


def avro_rows(stream: Seekable, after: int = 0) -> Iterator[Row | RowError]:
    """The records of an Avro container file as rows numbered from 1; a block whose
    rows all come at or before row `after` is passed over without decoding (a resumed
    run settled them). FileError when the header cannot be read."""
    source = _Source(stream, _magic(stream), len(MAGIC), keep=True)
    blocks = _open(source)
    header = source.header()
    sync = header[-SYNC_SIZE:]
    flat = _plain_record(blocks.writer_schema)
    number = 0
    while True:
        start = source.offset
        try:
            block = next(blocks, None)
        except Exception as exc:  # any fault of a corrupt block, raised from C: never a crash
            rows, resume = _skip_corrupt(stream, start, sync)
            yield from _failed(number, rows, start, _reason(exc))
            number += rows
            if resume is None:
                return
            stream.seek(resume)
            source = _Source(stream, header, resume)
            blocks = _open(source)
            continue
        if block is None:
            return
        if number + block.num_records <= after:
            number += block.num_records
            continue
        try:
            records = list(block)
            _check_consumed(block)
        except Exception as exc:  # the records do not decode: the whole block fails
            yield from _failed(number, block.num_records, start, _reason(exc))
            number += block.num_records
            continue
        for record in records:
            number += 1
            yield _row(number, record, flat)


def _check_consumed(block: Any) -> None:
    """Raise if the block's records did not take exactly its bytes: corrupt lengths
    that still decoded. (`bytes_`, the block's data as fastavro holds it, is not in its
    typed interface: without it the check is skipped.)"""
    data = getattr(block, "bytes_", None)
    if isinstance(data, io.BytesIO):
        used = data.tell()
        size = data.seek(0, io.SEEK_END)
        if used != size:
            raise ValueError(f"its records take {used} of its {size} bytes")


def _magic(stream: Seekable) -> bytes:
    head = stream.read(len(MAGIC))
    if head != MAGIC:
        shown = "empty" if not head else f"starts with {head!r}"
        raise FileError(f"not an Avro object container file: {shown}, not {MAGIC!r}")
    return head


def _open(source: _Source) -> Any:
    """fastavro's block reader on `source`, its header read; FileError if it cannot be,
    or if the codec is not one fastavro can read here."""
    try:
        blocks = fastavro.block_reader(cast(IO[bytes], source))  # read() and tell()
    except Exception as exc:  # a header fastavro cannot parse, whatever it raised
        raise FileError(f"unreadable Avro header: {_reason(exc)}") from None
    codec = blocks.codec
    read_block = fastavro.read.BLOCK_READERS.get(codec)
    if read_block is None:
        raise FileError(f"unknown Avro codec {codec!r}")
    # fastavro registers a stand-in that fails at the first block for a codec whose
    # library is not installed (snappy needs cramjam): say so once, for the file.
    if getattr(read_block, "__name__", "") == "missing":
        raise FileError(f"the Avro codec {codec!r} needs a library not installed here")
    return blocks


class _Source:
    """The file's bytes for fastavro: `head` (bytes already read, or the header again
    when a new reader starts after a corrupt block), then the stream from `offset`.
    Counts where the next read starts, and refuses reads over MAX_BLOCK."""

    def __init__(self, stream: Seekable, head: bytes, offset: int, keep: bool = False) -> None:
        self._stream = stream
        self._head = head
        self._read: list[bytes] | None = [] if keep else None  # for header()
        self.offset = offset  # in the stream (a gzipped file: in its gunzipped bytes)

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > MAX_BLOCK:
            raise _TooLarge(f"a length of {size} bytes")
        if self._head:
            data, self._head = self._head[:size], self._head[size:]
            if len(data) < size:
                data += self._next(size - len(data))
        else:
            data = self._next(size)
        if self._read is not None:
            self._read.append(data)
        return data

    def _next(self, size: int) -> bytes:
        data = self._stream.read(size)
        self.offset += len(data)
        return data

    def header(self) -> bytes:
        """The bytes read so far (the header, once the reader is made); stops keeping."""
        header = b"".join(self._read or ())
        self._read = None
        return header

    def tell(self) -> int:
        return self.offset


def _skip_corrupt(stream: Seekable, start: int, sync: bytes) -> tuple[int, int | None]:
    """For the block at byte `start` that failed: how many rows it is counted as, and
    the offset of the block after it (None: the file ends first).

    The block ends where its size says when its sync marker is there, or when a sound
    block (or the end of the file) follows: then only its content, or its marker, is
    corrupt. Else its framing is, and the next sync marker ends it."""
    stream.seek(start)
    count, end = _frame(stream)
    rows = count if count is not None and 0 < count <= MAX_BLOCK_ROWS else 1
    if end is not None:
        marker = stream.read(SYNC_SIZE)
        after = end + SYNC_SIZE
        if marker == sync or (len(marker) == SYNC_SIZE and _sound_at(stream, after, sync)):
            return rows, after
    return rows, _next_sync(stream, start + 1, sync)


def _frame(stream: Seekable) -> tuple[int | None, int | None]:
    """The row count of the block at the stream's position, and where its data ends
    (None: its size is unreadable or over MAX_BLOCK, or the file ends first)."""
    count, size = _read_long(stream), _read_long(stream)
    if size is None or not 0 <= size <= MAX_BLOCK:
        return count, None
    data = stream.read(size)
    return count, stream.tell() if len(data) == size else None


def _sound_at(stream: Seekable, at: int, sync: bytes) -> bool:
    """Whether the file ends at `at`, or a block framed by its sync marker starts there."""
    stream.seek(at)
    if not stream.read(1):
        return True
    stream.seek(at)
    _, end = _frame(stream)
    return end is not None and stream.read(SYNC_SIZE) == sync


def _read_long(stream: Seekable) -> int | None:
    """An Avro long (zigzag varint) at the stream's position; None if cut short or
    longer than 10 bytes."""
    value = shift = 0
    for _ in range(10):
        byte = stream.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return (value >> 1) ^ -(value & 1)
        shift += 7
    return None


def _next_sync(stream: Seekable, start: int, sync: bytes) -> int | None:
    """The offset just after the first sync marker at or after `start`, or None."""
    stream.seek(start)
    at, tail = start, b""
    while chunk := stream.read(SCAN_CHUNK):
        window = tail + chunk
        found = window.find(sync)
        if found >= 0:
            return at - len(tail) + found + SYNC_SIZE
        tail = window[-(SYNC_SIZE - 1) :]
        at += len(chunk)
    return None


def _failed(number: int, rows: int, offset: int, reason: str) -> Iterator[RowError]:
    """A RowError for each of the `rows` rows after row `number`, held by the corrupt
    block at byte `offset`."""
    where = f"corrupt Avro block at byte {offset}"
    if rows > 1:
        where += f" (rows {number + 1} to {number + rows})"
    for row in range(number + 1, number + rows + 1):
        yield RowError(row, "", f"{where}: {reason}")


def _reason(exc: Exception) -> str:
    return str(exc).split("\n", 1)[0] or type(exc).__name__


# Rows


class _Clash(Exception):
    """Two values flatten to one column (a map key with a dot beside a nested field)."""


def _plain_record(schema: Any) -> bool:
    """Whether records of `schema` need no flattening or conversion: a record whose
    fields are all PLAIN types, enums, or unions of those."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return False
    return all(_plain(field["type"]) for field in schema["fields"])


def _plain(kind: Any) -> bool:
    if isinstance(kind, list):
        return all(_plain(branch) for branch in kind)
    if isinstance(kind, dict):
        return kind.get("type") == "enum" or (
            kind.get("type") in PLAIN and "logicalType" not in kind
        )
    return kind in PLAIN


def _row(number: int, record: Any, flat: bool) -> Row | RowError:
    if not isinstance(record, dict):
        return RowError(number, "", f"an Avro {type(record).__name__} value, not a record")
    if flat:
        if None in record.values():
            return number, {key: value for key, value in record.items() if value is not None}
        return number, record
    row: dict[str, Any] = {}
    try:
        _flatten(record, "", row)
    except _Clash as clash:
        return RowError(number, str(clash), "two values for this column (a map key with a '.')")
    return number, row


def _flatten(record: dict[str, Any], prefix: str, row: dict[str, Any]) -> None:
    """Put the values of `record` (a record or a map) into `row` under dotted names."""
    for key, value in record.items():
        if value is None:
            continue
        column = prefix + key
        if isinstance(value, dict):
            _flatten(value, column + ".", row)
            continue
        if column in row:
            raise _Clash(column)
        row[column] = _json(value)


def _json(value: Any) -> Any:
    """An Avro value as JSON can hold it (an array's records stay objects)."""
    if isinstance(value, str | int | float):  # bool is an int; Decimal stays (exact)
        return value
    if isinstance(value, list):
        return [_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _json(item) for key, item in value.items()}
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value  # Decimal and None: msgspec writes them as they are


def _iso(moment: datetime) -> str:
    text = moment.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text
