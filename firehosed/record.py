"""Records as staged in a firehose's queue: envelope facts plus the raw bytes.

A request's records go into a queue as one *block* (one frame, one CRC, one msgpack
encode of columns), not a frame each; a catch-up replay or a `pi` record goes as a
single `Record`. A cut reads both back into `Rows`: columns again, so an NDJSON or JSON
batch is a join of raw bytes, and a `Record` is made only where a format asks for one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import overload

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
    """The records one request appended to one queue, in order, as columns."""

    received: float
    types: list[str]
    ids: list[str]
    sessions: list[str | None]
    persons: list[str | None]
    times: list[float]
    raws: list[bytes]
    plain: bool = False  # no record holds a newline or carriage return


# A segment frame's payload is a Block when it starts with this byte (a Record's
# msgpack array starts with 0x97, a mark with its own letter).
BLOCK = 0x42

encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Record)
block_decoder = msgspec.msgpack.Decoder(Block)
_buffer = bytearray()


def encode(record: Record) -> bytes:
    """The record's msgpack bytes, allocated at their exact size.

    `Encoder.encode` returns bytes with spare capacity (about half a record here),
    which catch-up rings would keep for a day; encoding into a reused buffer and
    copying out does not.
    """
    encoder.encode_into(record, _buffer)
    return bytes(_buffer)


class Rows(Sequence[Record]):
    """Records as columns, oldest first: what a cut reads from a queue's frames.

    Indexing makes a `Record` (formats that need one record at a time); the columns
    themselves serve formats that need only the raw bytes.
    """

    __slots__ = ("ids", "persons", "plain", "raws", "received", "sessions", "times", "types")

    def __init__(self) -> None:
        self.types: list[str] = []
        self.ids: list[str] = []
        self.sessions: list[str | None] = []
        self.persons: list[str | None] = []
        self.times: list[float] = []
        self.received: list[float] = []
        self.raws: list[bytes] = []
        # No record holds a newline or carriage return: joined by newlines, NDJSON.
        self.plain = True

    def append(self, record: Record) -> None:
        self.types.append(record.type)
        self.ids.append(record.id)
        self.sessions.append(record.session)
        self.persons.append(record.person)
        self.times.append(record.time)
        self.received.append(record.received)
        self.raws.append(record.raw)
        self.plain = self.plain and b"\n" not in record.raw and b"\r" not in record.raw

    def add_block(self, block: Block, start: int, stop: int) -> None:
        """Records `start` to `stop` of `block`."""
        if start == 0 and stop == len(block.ids):  # the usual case: no slicing
            self.types += block.types
            self.ids += block.ids
            self.sessions += block.sessions
            self.persons += block.persons
            self.times += block.times
            self.raws += block.raws
        else:
            self.types += block.types[start:stop]
            self.ids += block.ids[start:stop]
            self.sessions += block.sessions[start:stop]
            self.persons += block.persons[start:stop]
            self.times += block.times[start:stop]
            self.raws += block.raws[start:stop]
        self.received += repeat(block.received, stop - start)
        self.plain = self.plain and block.plain

    def extend(self, other: Rows) -> None:
        for column in self._columns():
            getattr(self, column).extend(getattr(other, column))
        self.plain = self.plain and other.plain

    @classmethod
    def _columns(cls) -> tuple[str, ...]:
        return tuple(name for name in cls.__slots__ if name != "plain")

    def keys(self) -> list[tuple[str, str | None]]:
        """(id, session) of each record."""
        return list(zip(self.ids, self.sessions, strict=True))

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> Record: ...
    @overload
    def __getitem__(self, index: slice) -> Rows: ...
    def __getitem__(self, index: int | slice) -> Record | Rows:
        if isinstance(index, slice):
            rows = Rows()
            for column in self._columns():
                setattr(rows, column, getattr(self, column)[index])
            rows.plain = self.plain
            return rows
        return Record(
            self.types[index],
            self.ids[index],
            self.sessions[index],
            self.persons[index],
            self.times[index],
            self.received[index],
            self.raws[index],
        )

    def __iter__(self) -> Iterator[Record]:
        return map(
            Record,
            self.types,
            self.ids,
            self.sessions,
            self.persons,
            self.times,
            self.received,
            self.raws,
        )


def raws(records: Sequence[Record]) -> list[bytes]:
    """The records' raw bytes (a column already when `records` are Rows)."""
    return records.raws if isinstance(records, Rows) else [r.raw for r in records]
