"""The open days of an archive firehose, spilled per day and type while they run.

An archive firehose's queue is cut into ordinary batches; instead of being delivered,
each batch is spilled here, its records sorted by the day they were received on (in the
firehose's time zone) and by type, and only then marked done in the queue. When a day
has ended, its archive is built from its spills, one type at a time: the queue never
holds a whole day, and a build reads each record twice (columns, then rows), never more.

Layout, under the firehose's archive directory:

    spill/<YYYY-MM-DD>/<type, hex of its UTF-8>/<queue batch number, 12 digits>.<records>

Each file holds one queue batch's records of that day and type, framed (queue/frames.py)
msgpack `Record`s in the order received. A spill file is written atomically and
durably under a name given by its batch number, so a batch spilled again after a crash
(before the queue heard it was done) replaces its own files: never a record twice.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import date
from pathlib import Path

import msgspec

from firehosed.archive.days import Days
from firehosed.fileio import fsync_dir, make_dirs, write_durably
from firehosed.formats.zipcsv import Summary
from firehosed.queue.frames import frame, scan
from firehosed.record import Record, decoder, encode

READ_CHUNK = 4 << 20  # bytes: spill files are read in pieces this big, never whole
KEYS = ".keys"  # beside a spill file: its records' flattened keys (msgpack list)


class Spill:
    """The spilled records of one archive firehose's open (and ended, unbuilt) days."""

    def __init__(self, root: Path, days: Days, sync: bool = True) -> None:
        self.root = root / "spill"
        self.days = days
        self.sync = sync
        # Bytes on disk, for the storage budget (a respilled batch is counted once more
        # until its day is dropped: an overcount, never an undercount).
        self.bytes = (
            sum(p.stat().st_size for p in self.root.glob("*/*/*")) if self.root.is_dir() else 0
        )

    def add(
        self,
        batch: int,
        records: Sequence[Record],
        keys: Callable[[bytes], Iterable[str]] | None = None,
    ) -> list[date]:
        """Spill queue batch number `batch` (a worker thread); the days it touched.

        With `keys` (a record's flattened keys), each spill file gets a `.keys` file
        beside it, so that a build knows its columns without reading the records twice.
        """
        groups: dict[tuple[date, str], list[bytes]] = {}
        seen: dict[tuple[date, str], set[str]] = {}
        for record in records:
            group = (self.days.of(record.received), record.type)
            groups.setdefault(group, []).append(frame(encode(record)))
            if keys is not None:
                seen.setdefault(group, set()).update(keys(record.raw))
        for (day, kind), frames in groups.items():
            directory = self.root / day.isoformat() / kind.encode().hex()
            make_dirs(directory, self.sync)
            # The name carries the count, so that counting a day lists, never reads.
            name = f"{batch:012d}.{len(frames)}"
            data = b"".join(frames)
            if keys is not None:  # first: a spill file without its keys is read twice
                summary = msgspec.msgpack.encode(sorted(seen[day, kind]))
                write_durably(directory / (name + KEYS), summary, self.sync)
            write_durably(directory / name, data, self.sync)
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

    def records(self, day: date, kind: str) -> Iterator[Record]:
        """`day`'s records of type `kind`, in the order received (queue batch order)."""
        directory = self.root / day.isoformat() / kind.encode().hex()
        for path in sorted(directory.iterdir()):
            if _count(path.name) is not None:
                yield from _read(path)

    def summary(self, day: date, kind: str) -> Summary | None:
        """The keys, records and bytes of `day`'s spills of type `kind`, when every spill
        file has its keys noted; else None (the build reads the records twice)."""
        directory = self.root / day.isoformat() / kind.encode().hex()
        keys: set[str] = set()
        rows = size = 0
        for path in directory.iterdir():
            count = _count(path.name)
            if count is None:
                continue
            noted = path.with_name(path.name + KEYS)
            if not noted.exists():
                return None
            keys.update(msgspec.msgpack.decode(noted.read_bytes(), type=list[str]))
            rows += count
            size += path.stat().st_size
        return Summary(keys, rows, size)

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


def _read(path: Path) -> Iterable[Record]:
    """The records of one spill file, read in chunks of READ_CHUNK bytes at most (plus
    one record: a frame is never split)."""
    with path.open("rb") as f:
        rest, offset = b"", 0  # `rest` starts at file offset `offset`
        while chunk := f.read(READ_CHUNK):
            data = rest + chunk
            end = 0
            for span in scan(data):
                if span.payload is None:
                    if span.end < len(data):  # written durably once: damage, not a tail
                        raise ValueError(f"{path}: a damaged record at byte {offset + span.start}")
                    break  # the last frame continues in the next chunk
                yield decoder.decode(span.payload)
                end = span.end
            rest, offset = data[end:], offset + end
        if rest:
            raise ValueError(f"{path}: a damaged record at the end of a spill file")
