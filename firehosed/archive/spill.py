"""The open days of an archive firehose, spilled per day and type while they run.

An archive firehose's queue is cut into ordinary batches; instead of being delivered,
each batch is spilled here: its records sorted by the day they were received on (in the
firehose's time zone) and by type, each group turned into CSV rows (a `zipcsv.Part`),
and only then marked done in the queue. When a day has ended, its archive is assembled
from its parts, one type at a time (formats/zipcsv.py): the queue never holds a whole
day, and the CSV work is done while the day runs, not after midnight.

Layout, under the firehose's archive directory:

    spill/<YYYY-MM-DD>/<type, hex of its UTF-8>/<queue batch number, 12 digits>.<rows>

Each file is one part: a prefix (the msgpack header's length and the CRC-32 of the
rows, `>II`), the header (the part's columns, msgpack), then the CSV rows. A spill file
is written atomically and durably under a name given by its batch number, so a batch
spilled again after a crash (before the queue heard it was done) replaces its own
files: never a record twice.
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import BinaryIO

import msgspec

from firehosed.archive.days import Days
from firehosed.fileio import fsync_dir, make_dirs, write_durably
from firehosed.formats.zipcsv import Part
from firehosed.record import Record

PREFIX = struct.Struct(">II")  # header length, CRC-32 of the rows
READ_CHUNK = 1 << 20  # bytes: spill files are read in pieces this big, never whole

Rows = Callable[[Sequence[Record]], tuple[list[str], bytes]]  # records of a type -> CSV


class Spill:
    """The spilled rows of one archive firehose's open (and ended, unbuilt) days."""

    def __init__(self, root: Path, days: Days, sync: bool = True) -> None:
        self.root = root / "spill"
        self.days = days
        self.sync = sync
        # Bytes on disk, for the storage budget (a respilled batch is counted once more
        # until its day is dropped: an overcount, never an undercount).
        self.bytes = (
            sum(p.stat().st_size for p in self.root.glob("*/*/*")) if self.root.is_dir() else 0
        )

    def add(self, batch: int, records: Sequence[Record], rows: Rows) -> list[date]:
        """Spill queue batch number `batch` (a worker thread), each day and type's
        records made CSV rows by `rows`; the days it touched."""
        groups: dict[tuple[date, str], list[Record]] = {}
        for record in records:
            groups.setdefault((self.days.of(record.received), record.type), []).append(record)
        for (day, kind), group in groups.items():
            directory = self.root / day.isoformat() / kind.encode().hex()
            make_dirs(directory, self.sync)
            header, csv = rows(group)
            head = msgspec.msgpack.encode(header)
            data = PREFIX.pack(len(head), zlib.crc32(csv)) + head + csv
            # The name carries the count, so that counting a day lists, never reads.
            write_durably(directory / f"{batch:012d}.{len(group)}", data, self.sync)
            self.bytes += len(data)
        return sorted({day for day, _ in groups})

    def spilled_days(self) -> list[date]:
        """Days with spilled records, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(date.fromisoformat(p.name) for p in self.root.iterdir() if p.is_dir())

    def types(self, day: date) -> list[str]:
        """The types spilled for `day`, sorted."""
        directory = self.root / day.isoformat()
        if not directory.is_dir():
            return []
        return sorted(bytes.fromhex(p.name).decode() for p in directory.iterdir() if p.is_dir())

    def parts(self, day: date, kind: str) -> list[Part]:
        """`day`'s parts of type `kind`, in the order received (queue batch order)."""
        directory = self.root / day.isoformat() / kind.encode().hex()
        return [
            _part(path, rows)
            for path in sorted(directory.iterdir())
            if (rows := _count(path.name)) is not None
        ]

    def count(self, day: date) -> int:
        """How many records `day` holds so far (from the spill files' names)."""
        directory = self.root / day.isoformat()
        if not directory.is_dir():
            return 0
        return sum(
            _count(path.name) or 0 for kind in directory.iterdir() for path in kind.iterdir()
        )

    def drop(self, day: date) -> None:
        """Forget `day`'s spills (its archive was delivered)."""
        directory = self.root / day.isoformat()
        if directory.is_dir():
            self.bytes -= sum(p.stat().st_size for p in directory.glob("*/*"))
            shutil.rmtree(directory)
            if self.sync:
                fsync_dir(self.root)


def _count(name: str) -> int | None:
    """The record count in a spill file's name (`<batch>.<count>`), None for another file."""
    batch, _, count = name.partition(".")
    return int(count) if batch.isdigit() and count.isdigit() else None


def _part(path: Path, rows: int) -> Part:
    with path.open("rb") as f:
        size, crc = PREFIX.unpack(f.read(PREFIX.size))
        header = msgspec.msgpack.decode(f.read(size), type=list[str])
    start = PREFIX.size + size
    return Part(header, rows, path.stat().st_size - start, lambda: _open(path, start, crc))


@contextmanager
def _open(path: Path, start: int, crc: int) -> Iterator[BinaryIO]:
    with path.open("rb", buffering=0) as f:
        f.seek(start)
        yield io.BufferedReader(_Checked(f, path, crc), READ_CHUNK)


class _Checked(io.RawIOBase):
    """A spill file's rows, read through once: at their end, ValueError if their
    CRC-32 is not the one written with them (the disk damaged them)."""

    def __init__(self, f: BinaryIO, path: Path, crc: int) -> None:
        self._f, self._path, self._want, self._crc = f, path, crc, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n: int = self._f.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self._crc = zlib.crc32(buffer[:n], self._crc)
        elif self._crc != self._want:
            raise ValueError(f"{self._path}: damaged rows (their CRC-32 does not match)")
        return n
