"""Records as staged in a firehose's queue: envelope facts plus the raw bytes.

A request's records go into a queue as one *block* (one frame, one CRC), not a frame
each; a catch-up replay or a `pi` record goes as a single `Record`. A block's frame
holds the records' raw bytes as they will go into an NDJSON file, joined and each
ended by a newline, after a head of their envelope columns and where each record ends:

    | b"K" | head length (4, LE) | msgpack Head | b"\n" | each record's bytes + b"\n" |

The head's columns are `Packed`: each column of strings is its values' UTF-8 joined by
newlines, so a column is one split for Python and, for a columnar format, text that
Arrow splits into a column without a Python object per value.

A cut reads both back into `Rows`: an NDJSON batch of blocks is then a copy of byte
ranges, the envelope columns are decoded only when a format or a manifest asks for
them, and a `Record` is made only where a format needs one at a time. Blocks written
before this layout are still read: b"J" (the same, its columns a msgpack `Columns` of
lists) as they are, b"B" (the columns and a list of raws in one msgpack array)
converted as they are read.
"""

from __future__ import annotations

import mmap
import struct
import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from itertools import accumulate, chain, count, islice, repeat
from operator import add, is_
from typing import Any, overload

import msgspec


class Record(msgspec.Struct, array_like=True, gc=False):
    """One signal queued for one firehose.

    `raw` is the JSON object exactly as received, unless the daemon had to change it
    (catch-up copies and later signals of an identified session get the person set).
    Times are unix seconds: `time` is the signal's event time, `received` when we got it.
    """

    type: str
    id: str
    session: str | None
    person: str | None
    time: float
    received: float
    raw: bytes


class Block(msgspec.Struct, array_like=True, gc=False):
    """The records one request appended to one queue, in order, as columns (what the
    router appends; also the layout of blocks written before `JOINED`)."""

    received: float
    types: list[str]
    ids: list[str]
    sessions: list[str | None]
    persons: list[str | None]
    times: list[float]
    raws: list[bytes]
    plain: bool = False  # no record holds a newline or carriage return


# A segment frame's payload is a block when it starts with one of these bytes (a
# Record's msgpack array starts with 0x97, a mark with its own letter).
BLOCK = 0x42  # b"B": a msgpack Block (written by older versions; read, never written)
JOINED = 0x4A  # b"J": as laid out above, its columns `Columns` (older; read, never written)
PACKED = 0x4B  # b"K": a block as laid out above
BLOCKS = (BLOCK, JOINED, PACKED)


class Columns(msgspec.Struct, array_like=True, gc=False):
    """A block's envelope columns, one entry per record."""

    types: list[str]
    ids: list[str]
    sessions: list[str | None]
    persons: list[str | None]
    times: list[float]


# The field of `Packed` that marks each nullable string column's None values.
_NULLS = {"sessions": "session_nulls", "persons": "person_nulls"}


class Packed(msgspec.Struct, array_like=True, gc=False):
    """A block's envelope columns as a `PACKED` frame's head holds them.

    A column of strings is their UTF-8 joined by newlines, a None written as empty and
    marked by a 1 in the column's `nulls` (b"" when it has no None); a column with a
    value that holds a newline is the list itself. Times are doubles, little-endian.
    """

    types: bytes | list[str]
    ids: bytes | list[str]
    sessions: bytes | list[str | None]
    persons: bytes | list[str | None]
    session_nulls: bytes
    person_nulls: bytes
    times: bytes

    def __len__(self) -> int:
        return len(self.times) // 8

    def nulls(self, name: str) -> bytes:
        """The marks of None of string column `name` (b"" when it has none)."""
        return getattr(self, _NULLS[name]) if name in _NULLS else b""

    def native_times(self) -> bytes:
        """`times` in this machine's byte order (as Arrow reads a buffer)."""
        if not _SWAP:
            return self.times
        times = array("d", self.times)
        times.byteswap()
        return times.tobytes()


def pack(columns: Columns) -> Packed:
    """`columns` packed for a frame's head."""
    sessions, session_nulls = _joined(columns.sessions)
    persons, person_nulls = _joined(columns.persons)
    times = array("d", columns.times)
    if _SWAP:
        times.byteswap()
    return Packed(
        _joined(columns.types)[0],
        _joined(columns.ids)[0],
        sessions,
        persons,
        session_nulls,
        person_nulls,
        times.tobytes(),
    )


def _joined(values: list[Any]) -> tuple[bytes | list[Any], bytes]:
    """A column of strings as `Packed` holds it, with its nulls."""
    try:
        text, nulls = "\n".join(values), b""
    except TypeError:  # a None among them
        text = "\n".join([value or "" for value in values])
        nulls = bytes(map(is_, values, repeat(None)))
    data = text.encode()
    if data.count(b"\n") != len(values) - 1:  # a value holds a newline (or none is given)
        return values, b""
    return data, nulls


def unpack(packed: Packed, name: str) -> list[Any]:
    """Column `name` of a packed head, as a list."""
    column = getattr(packed, name)
    if name == "times":
        return array("d", packed.native_times()).tolist()
    if not isinstance(column, bytes):
        return list(column)  # a copy: whoever takes it may change it
    values: list[Any] = column.decode().split("\n") if len(packed) else []
    marks = packed.nulls(name)
    if marks:
        values = [None if null else value for value, null in zip(values, marks, strict=True)]
    return values


class Head(msgspec.Struct, array_like=True, gc=False):
    """What a joined block's frame holds before its records' bytes."""

    received: float
    plain: bool
    sizes: bytes  # array("I"), little-endian: each record's size in bytes
    columns: msgspec.Raw  # msgpack Packed (Columns in a `JOINED` frame), decoded when asked


encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Record)
block_decoder = msgspec.msgpack.Decoder(Block)
_head_decoder = msgspec.msgpack.Decoder(Head)
_columns_decoder = msgspec.msgpack.Decoder(Columns)
_packed_decoder = msgspec.msgpack.Decoder(Packed)
_HEAD_LENGTH = struct.Struct("<I")
_SWAP = sys.byteorder != "little"
_buffer = bytearray()


def encode(record: Record) -> bytes:
    """The record's msgpack bytes, allocated at their exact size.

    `Encoder.encode` returns bytes with spare capacity (about half a record here),
    which catch-up rings would keep for a day; encoding into a reused buffer and
    copying out does not.
    """
    encoder.encode_into(record, _buffer)
    return bytes(_buffer)


def encoded_block(block: Block, room: int = 0) -> bytearray:
    """`block`'s payload as a `PACKED` frame holds it, behind `room` bytes left free
    (a frame header's). One join copies the records' bytes, the usual case's only copy.
    """
    raws = block.raws
    sizes = array("I", map(len, raws))
    if _SWAP:
        sizes.byteswap()
    columns = pack(Columns(block.types, block.ids, block.sessions, block.persons, block.times))
    head = encoder.encode(
        Head(block.received, block.plain, sizes.tobytes(), msgspec.Raw(encoder.encode(columns)))
    )
    start = b"".join((bytes(room), b"K", _HEAD_LENGTH.pack(len(head)), head))
    # start, b"\n", then each record followed by b"\n"
    return bytearray(b"\n").join([start, *raws, b""])


class Joined:
    """One block read back: its records' bytes (each followed by a newline), their
    sizes, and its columns, decoded the first time they are asked for."""

    __slots__ = (
        "_columns",
        "_ends",
        "_packed",
        "_raw_columns",
        "data",
        "packed_head",
        "plain",
        "received",
        "sizes",
    )

    def __init__(self, head: Head, data: memoryview, *, packed_head: bool = True) -> None:
        self.received = head.received
        self.plain = head.plain
        self.sizes = array("I")
        self.sizes.frombytes(head.sizes)
        if _SWAP:
            self.sizes.byteswap()
        self.data = data
        self._raw_columns = head.columns.copy()  # the decoded Raw is a view of the read
        self.packed_head = packed_head  # columns `Packed` (a `PACKED` frame), else `Columns`
        self._packed: Packed | None = None
        self._columns: Columns | None = None
        self._ends: array[int] | None = None

    @classmethod
    def read(cls, payload: memoryview | bytes | bytearray, *, data: bool = True) -> Joined:
        """The block in a frame's payload (tag included), either layout. Its records'
        bytes are copied out of `payload` (a reused buffer) unless it is a view of
        `bytes` or of a mapped file; without `data` they are left out (counting and noting
        ids)."""
        if payload[0] == BLOCK:  # older layout: converted
            payload = encoded_block(block_decoder.decode(payload[1:]))
        packed_head = payload[0] == PACKED
        view = memoryview(payload)
        (length,) = _HEAD_LENGTH.unpack_from(view, 1)
        body = 1 + _HEAD_LENGTH.size + length
        head = _head_decoder.decode(view[1 + _HEAD_LENGTH.size : body])
        records = view[body + 1 :]
        if not data:
            records = memoryview(b"")
        elif not isinstance(view.obj, (bytes, mmap.mmap)):
            records = memoryview(bytes(records))
        return cls(head, records, packed_head=packed_head)

    def __len__(self) -> int:
        return len(self.sizes)

    def packed(self) -> Packed:
        """The block's columns packed (as a `PACKED` frame holds them)."""
        if self._packed is None:
            if self.packed_head:
                self._packed = _packed_decoder.decode(self._raw_columns)
            else:
                self._packed = pack(self.columns())
        return self._packed

    def columns(self) -> Columns:
        if self._columns is None:
            if self.packed_head:
                packed = self.packed()
                self._columns = Columns(
                    *(unpack(packed, name) for name in Columns.__struct_fields__)
                )
            else:
                self._columns = _columns_decoder.decode(self._raw_columns)
        return self._columns

    def column(self, name: str) -> list[Any]:
        """Column `name` of `Columns`, the block's own when decoded already (not a copy),
        else only that column decoded."""
        if self._columns is None and self.packed_head:
            return unpack(self.packed(), name)
        column: list[Any] = getattr(self.columns(), name)
        return column

    def ends(self) -> array[int]:
        """Where each record's bytes end in `data`."""
        if self._ends is None:
            # Record i ends after the bytes of records 0..i and the i newlines between.
            self._ends = array("I", map(add, accumulate(self.sizes), count()))
        return self._ends

    def start(self, index: int) -> int:
        """Where record `index`'s bytes start."""
        return self.ends()[index - 1] + 1 if index else 0

    def size(self, start: int, stop: int) -> int:
        """The raw bytes of records `start` to `stop` (newlines not counted; a block
        read with its data)."""
        if stop <= start:
            return 0
        if start == 0 and stop == len(self.sizes):
            return len(self.data) - stop
        return self.ends()[stop - 1] - self.start(start) - (stop - 1 - start)

    def fitting(self, start: int, room: int) -> int:
        """How many records from `start` on hold fewer than `room` raw bytes between
        them, plus the one that reaches `room` (all of them if none does)."""
        if self.size(start, len(self)) < room:
            return len(self) - start
        index = bisect_left(range(start, len(self)), room, key=lambda i: self.size(start, i + 1))
        return index + 1

    def raws(self, start: int, stop: int) -> list[bytes]:
        data, ends = self.data, self.ends()
        starts = chain((self.start(start),), map((1).__add__, islice(ends, start, stop - 1)))
        views = map(data.__getitem__, map(slice, starts, islice(ends, start, stop)))
        return list(map(bytes, views))

    def text(self, start: int, stop: int) -> memoryview:
        """Records `start` to `stop`, each followed by a newline."""
        if stop <= start:
            return self.data[:0]
        if start == 0 and stop == len(self.sizes):
            return self.data
        return self.data[self.start(start) : self.ends()[stop - 1] + 1]


class _Lists:
    """Records as plain columns (appended one at a time, or a slice of Rows)."""

    __slots__ = ("ids", "persons", "raws", "received", "sessions", "times", "types")

    def __init__(self) -> None:
        self.types: list[str] = []
        self.ids: list[str] = []
        self.sessions: list[str | None] = []
        self.persons: list[str | None] = []
        self.times: list[float] = []
        self.received: list[float] = []
        self.raws: list[bytes] = []

    def __len__(self) -> int:
        return len(self.ids)

    def column(self, name: str) -> list[Any]:
        column: list[Any] = getattr(self, name)
        return column

    def text(self) -> bytes:
        return b"\n".join([*self.raws, b""])

    def record(self, index: int) -> Record:
        return Record(
            self.types[index],
            self.ids[index],
            self.sessions[index],
            self.persons[index],
            self.times[index],
            self.received[index],
            self.raws[index],
        )


class _Part:
    """Records `start` to `stop` of a Joined block."""

    __slots__ = ("block", "start", "stop")

    def __init__(self, block: Joined, start: int, stop: int) -> None:
        self.block, self.start, self.stop = block, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def column(self, name: str) -> list[Any]:
        block, start, stop = self.block, self.start, self.stop
        if name == "raws":
            return block.raws(start, stop)
        if name == "received":
            return [block.received] * (stop - start)
        return block.column(name)[start:stop]  # a copy: whoever takes it may change it

    def text(self) -> memoryview:
        return self.block.text(self.start, self.stop)

    def record(self, index: int) -> Record:
        block, at = self.block, self.start + index
        columns = block.columns()
        return Record(
            columns.types[at],
            columns.ids[at],
            columns.sessions[at],
            columns.persons[at],
            columns.times[at],
            block.received,
            bytes(block.data[block.start(at) : block.ends()[at]]),
        )


COLUMNS = ("types", "ids", "sessions", "persons", "times", "received", "raws")


class Rows(Sequence[Record]):
    """Records, oldest first: what a cut reads from a queue's frames.

    Held as the blocks (or parts of blocks) and single records read: `text` is the
    records' bytes newline-ended without a copy per record, and a column is built the
    first time it is asked for. Indexing makes a `Record` (formats that need one record
    at a time). Rows are read, not edited: a column handed out is not kept in step with
    records added after.
    """

    __slots__ = ("_cache", "_length", "_parts", "_starts", "plain")

    def __init__(self) -> None:
        self._parts: list[_Part | _Lists] = []
        self._cache: dict[str, list[Any]] = {}
        self._starts: list[int] | None = None  # each part's first index
        self._length = 0
        # No record holds a newline or carriage return: `text` is NDJSON.
        self.plain = True

    def append(self, record: Record) -> None:
        last = self._parts[-1] if self._parts else None
        if not isinstance(last, _Lists):
            last = _Lists()
            self._parts.append(last)
        last.types.append(record.type)
        last.ids.append(record.id)
        last.sessions.append(record.session)
        last.persons.append(record.person)
        last.times.append(record.time)
        last.received.append(record.received)
        last.raws.append(record.raw)
        self._grew(1)
        self.plain = self.plain and b"\n" not in record.raw and b"\r" not in record.raw

    def add_block(self, block: Joined, start: int, stop: int) -> None:
        """Records `start` to `stop` of `block`."""
        if stop > start:
            self._parts.append(_Part(block, start, stop))
            self._grew(stop - start)
        self.plain = self.plain and block.plain

    def extend(self, other: Rows) -> None:
        self._parts += other._parts
        self._grew(len(other))
        self.plain = self.plain and other.plain

    def _grew(self, records: int) -> None:
        self._length += records
        self._starts = None
        if self._cache:
            self._cache = {}

    def _column(self, name: str) -> list[Any]:
        column = self._cache.get(name)
        if column is None:
            if len(self._parts) == 1:
                column = self._parts[0].column(name)
            else:
                column = []
                for part in self._parts:
                    column += part.column(name)
            self._cache[name] = column
        return column

    @property
    def types(self) -> list[str]:
        return self._column("types")

    @property
    def ids(self) -> list[str]:
        return self._column("ids")

    @property
    def sessions(self) -> list[str | None]:
        return self._column("sessions")

    @property
    def persons(self) -> list[str | None]:
        return self._column("persons")

    @property
    def times(self) -> list[float]:
        return self._column("times")

    @property
    def received(self) -> list[float]:
        return self._column("received")

    @property
    def raws(self) -> list[bytes]:
        return self._column("raws")

    def text(self) -> bytes:
        """The records' bytes, each followed by a newline (NDJSON when `plain`)."""
        return b"".join(self.pieces())

    def pieces(self) -> list[memoryview | bytes]:
        """`text` in pieces: a view of each block's bytes, the other records joined."""
        return [part.text() for part in self._parts]

    def spans(self) -> list[tuple[memoryview, array[int]] | list[bytes]]:
        """The records as held: each block's bytes (`text`'s views) with its records'
        sizes (a columnar format's offsets), or records read one by one, as a list."""
        return [
            (part.text(), part.block.sizes[part.start : part.stop])
            if isinstance(part, _Part)
            else part.raws
            for part in self._parts
        ]

    def packs(self) -> list[tuple[Packed, int, int]]:
        """The records' envelope columns as held, for a columnar format: each block's
        `Packed` head with the range of its records these rows hold; records read one
        by one, packed here."""
        return [
            (part.block.packed(), part.start, part.stop)
            if isinstance(part, _Part)
            else (
                pack(Columns(part.types, part.ids, part.sessions, part.persons, part.times)),
                0,
                len(part),
            )
            for part in self._parts
        ]

    def keys(self) -> list[tuple[str, str | None]]:
        """(id, session) of each record."""
        return list(zip(self.ids, self.sessions, strict=True))

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> Record: ...
    @overload
    def __getitem__(self, index: slice) -> Rows: ...
    def __getitem__(self, index: int | slice) -> Record | Rows:
        if isinstance(index, slice):
            lists = _Lists()
            for name in COLUMNS:
                setattr(lists, name, self._column(name)[index])
            rows = Rows()
            if len(lists):
                rows._parts.append(lists)
                rows._length = len(lists)
            rows.plain = self.plain
            return rows
        # One record: from its part, building no column.
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("Rows index out of range")
        if self._starts is None:
            self._starts = list(accumulate(map(len, self._parts), initial=0))
        at = bisect_right(self._starts, index) - 1
        return self._parts[at].record(index - self._starts[at])

    def __iter__(self) -> Iterator[Record]:
        return map(Record, *map(self._column, COLUMNS))


def raws(records: Sequence[Record]) -> list[bytes]:
    """The records' raw bytes (a column already when `records` are Rows)."""
    return records.raws if isinstance(records, Rows) else [r.raw for r in records]
