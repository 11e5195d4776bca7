"""Framing in segment files: magic, length and CRC-32 before every payload (a request's
block of records, laid out as record.py says, a single Record, or a mark).

    | magic (2) | length (4, LE) | crc32 (4, LE) | payload (length) |

The magic lets recovery find the next intact frame after a corrupt one; the CRC tells a
torn or flipped record from an intact one.
"""

from __future__ import annotations

import mmap
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import NamedTuple

from firehosed.record import Block, encoded_block

MAGIC = b"\xfb\x1e"
HEADER = struct.Struct("<2sII")
MAX_PAYLOAD = 256 << 20


def frame(payload: bytes) -> bytes:
    """The framed bytes of one payload."""
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


class Span(NamedTuple):
    """A run of a segment: an intact frame (`payload` set) or corrupt bytes (`payload` None).

    `payload` is a view into the scanned data, not a copy: decode it or copy it before
    the data goes (a NamedTuple, not a dataclass: a batch cut makes one per record).
    """

    start: int
    end: int
    payload: memoryview | None


def scan(
    data: bytes | bytearray | memoryview, start: int = 0, *, more: bool = False
) -> Iterator[Span]:
    """Split `data[start:]` into intact frames and corrupt spans.

    A trailing span that is neither (a write cut short by a crash) is yielded as corrupt
    with `end == len(data)`; the caller decides whether that is a torn tail. With `more`
    (`data` is a chunk of a file that goes on), a frame whose header says it ends past
    the data is that trailing span at once, without looking for a frame inside it.
    """
    view = memoryview(data)
    pos, size = start, len(view)
    while pos < size:
        payload = _frame_at(view, pos)
        if payload is not None:
            end = pos + HEADER.size + len(payload)
            yield Span(pos, end, payload)
            pos = end
            continue
        if more and _cut_short(view, pos):
            yield Span(pos, size, None)
            return
        resume = _next_frame(view, pos + 1)
        yield Span(pos, resume, None)
        pos = resume


def _frame_at(view: memoryview, pos: int) -> memoryview | None:
    if pos + HEADER.size > len(view):
        return None
    magic, length, crc = HEADER.unpack_from(view, pos)
    end = pos + HEADER.size + length
    if magic != MAGIC or length > MAX_PAYLOAD or end > len(view):
        return None
    payload = view[pos + HEADER.size : end]
    return payload if zlib.crc32(payload) == crc else None


def _cut_short(view: memoryview, pos: int) -> bool:
    """Whether the data ends inside what looks like a frame's header or payload."""
    if pos + HEADER.size > len(view):
        return bool(view[pos : pos + len(MAGIC)] == MAGIC[: len(view) - pos])
    magic, length, _ = HEADER.unpack_from(view, pos)
    return bool(magic == MAGIC and length <= MAX_PAYLOAD and pos + HEADER.size + length > len(view))


def _next_frame(view: memoryview, pos: int) -> int:
    """Offset of the next intact frame at or after `pos`, or the end of the data."""
    raw = view.obj
    if not isinstance(raw, (bytes, mmap.mmap)) or len(raw) != len(view):
        raw = bytes(view)
    while True:
        pos = raw.find(MAGIC, pos, len(view))
        if pos < 0:
            return len(view)
        if _frame_at(view, pos) is not None:
            return pos
        pos += 1


class Unsealed:
    """A Block encoded behind room for its frame header. The header, and the CRC over
    the payload it holds, are filled in by the first committer thread that writes the
    frame (`sealed`): the event loop encodes a request's records once and goes on, and
    the CRC of a large block (zlib lets go of the GIL for it) is not on its path.
    Several queues may share one (a request's records bound for several firehoses)."""

    __slots__ = ("_lock", "_sealed", "data")

    def __init__(self, block: Block) -> None:
        self.data = encoded_block(block, HEADER.size)
        self._lock = threading.Lock()
        self._sealed = False

    def __len__(self) -> int:
        return len(self.data)

    def payload(self) -> memoryview:
        return memoryview(self.data)[HEADER.size :]

    def sealed(self) -> bytearray:
        """The whole frame, header and CRC in place (a committer thread)."""
        with self._lock:
            if not self._sealed:
                with self.payload() as payload:
                    crc = zlib.crc32(payload)
                HEADER.pack_into(self.data, 0, MAGIC, len(self.data) - HEADER.size, crc)
                self._sealed = True
        return self.data


# What a queue is given to append: framed bytes, or a Block to be sealed as it is written.
Framed = bytes | bytearray | Unsealed


def frame_block(block: Block) -> bytearray:
    """The framed bytes of a Block (tests, tools: the queue seals its own)."""
    return Unsealed(block).sealed()
