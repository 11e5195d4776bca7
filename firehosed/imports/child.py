"""The process that reads a large import file (reader.py starts it, one per file).

It gets its `Job` (pickled, on stdin) and writes the file's chunks to stdout, each a
`Frame` in msgpack after its length, then ends; a file it cannot read ends it with a
"failed" frame (the FileError's reason), a bug with a "crashed" one (its traceback).
A file still being fetched (`Job.arriving`) is read as it arrives (arriving.py): the
daemon keeps the child's stdin open meanwhile, and closes it when the fetch stops short
(or the daemon is gone); the child then reads what is on disk and ends with an
"abandoned" frame.
msgpack, not pickle, because pickle's memo of every string it writes made pickling a
chunk cost a tenth of the child's time (0.86 us a row, msgspec's encoder 0.08). It imports
only what reading rows takes (no asyncio loop, no logging, no config module, no OpenSSL,
fastavro only for Avro): about 20 MB of memory as it starts, where the daemon's modules
would take 35 (tests/test_imports.py holds the list).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from time import time as now  # a name of this module: tests fix the import's time
from typing import BinaryIO, Literal, NamedTuple

import msgspec

from firehosed.envelope import Envelopes
from firehosed.fields import FieldsConfig
from firehosed.imports.arriving import Abandoned, Arriving
from firehosed.imports.rows import (
    CsvBlock,
    FileError,
    Row,
    RowError,
    RowMaker,
    read_csv_blocks,
    read_rows,
)

LENGTH = 8  # bytes of the length before each frame


class Job(NamedTuple):
    """All that reading one file takes; it crosses to the child pickled."""

    path: Path
    format: str
    after: int  # rows up to this one were settled before a restart: read past them
    size: int  # rows a chunk
    task: str
    columns: dict[str, str]
    fields: FieldsConfig
    key: str  # the file as `name@version`: the ids made for its rows hold it
    arriving: int | None = None  # a file still being fetched: its size once whole


def _no_signals() -> Envelopes:
    return Envelopes([], [], [], [], [], [], None, True)


class Chunk(msgspec.Struct, array_like=True, gc=False):
    """Up to `Job.size` rows of a file."""

    # The valid rows' signals, with their envelopes (JSON from msgspec: no newlines).
    signals: Envelopes = msgspec.field(default_factory=_no_signals)
    numbers: list[int] = msgspec.field(default_factory=list)  # the row of each signal
    errors: list[RowError] = msgspec.field(default_factory=list)
    last: int = 0  # the number of the last row read (0: none)
    ended: bool = False


class Frame(msgspec.Struct, array_like=True, gc=False):
    """What the child sends: a chunk, or why it stopped (then it ends)."""

    kind: Literal["chunk", "failed", "crashed", "abandoned"]
    chunk: Chunk | None = None
    # A FileError's reason ("failed"), a traceback ("crashed"), where the file's fetch
    # stopped ("abandoned").
    message: str = ""


FRAMES = msgspec.msgpack.Decoder(Frame)
_ENCODER = msgspec.msgpack.Encoder()


def serve(source: BinaryIO | None = None, out: BinaryIO | None = None) -> None:
    """The child: read the job from `source`, write its chunks to `out` (stdin, stdout).
    A Ctrl-C at a terminal is the daemon's to act on: it ends the child itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source = source or sys.stdin.buffer
    out = out or sys.stdout.buffer
    job: Job = pickle.load(source)
    try:
        _send(out, _serve(job, out, partial(_closed, source.fileno())))
    except BrokenPipeError:  # the daemon is gone
        with contextlib.suppress(OSError):
            os.close(out.fileno())  # no flush at exit onto the closed pipe


def _closed(fd: int, timeout: float) -> bool:
    """Whether the daemon closed the child's stdin (`fd`), waited for up to `timeout`
    seconds: it writes nothing after the job, so the pipe is readable only at its end."""
    return bool(select.select([fd], [], [], timeout)[0])


def _serve(job: Job, out: BinaryIO, stopped: Callable[[float], bool]) -> Frame:
    """Send every chunk of `job` but the last; the last frame to send."""
    try:
        rows, maker = open_rows(job, stopped)
        done = job.after
        while not (chunk := take(rows, maker, job.key, done, job.size)).ended:
            _send(out, Frame("chunk", chunk))
            done = chunk.last or done
    except FileError as exc:
        return Frame("failed", message=str(exc))
    except Abandoned as exc:
        return Frame("abandoned", message=str(exc))
    except BrokenPipeError:
        raise
    except Exception:
        return Frame("crashed", message=traceback.format_exc())
    return Frame("chunk", chunk)


def _send(out: BinaryIO, frame: Frame) -> None:
    data = _ENCODER.encode(frame)
    out.write(len(data).to_bytes(LENGTH, "little"))
    out.write(data)
    out.flush()


def open_rows(
    job: Job, stopped: Callable[[float], bool] | None = None
) -> tuple[Iterator[Row | RowError | CsvBlock], RowMaker]:
    """A file's rows for `take` (CSV's in blocks of `job.size` rows, made in bulk), and
    the maker of their signals. A file still arriving waits for its bytes, and raises
    Abandoned at the end of those on disk once `stopped` says its fetch stopped."""
    opener = None
    if job.arriving is not None:
        assert stopped is not None, "a file still arriving is read with its fetch's end"
        opener = partial(Arriving, size=job.arriving, stopped=stopped)
    if job.format == "csv":
        rows: Iterator[Row | RowError | CsvBlock] = read_csv_blocks(
            job.path, job.size, opener=opener
        )
    else:
        rows = read_rows(job.path, job.format, after=job.after, opener=opener)
    return rows, RowMaker(job.task, job.columns, job.fields)


def take(
    rows: Iterator[Row | RowError | CsvBlock], maker: RowMaker, key: str, done: int, size: int
) -> Chunk:
    """The next `size` rows after row `done` (rows up to it were settled before a
    restart, and are read past)."""
    chunk = Chunk()
    at = now()
    for item in rows:
        if isinstance(item, CsvBlock):
            _take_block(chunk, item, maker, key, done, at)
        else:
            number = item.row if isinstance(item, RowError) else item[0]
            if number <= done:
                continue
            chunk.last = number
            if isinstance(item, RowError):
                chunk.errors.append(item)
            else:
                made = maker.signal(item[1], number, key, at)
                if isinstance(made, RowError):
                    chunk.errors.append(made)
                else:
                    chunk.signals.append(made[1], made[0])
                    chunk.numbers.append(number)
        if len(chunk.signals) + len(chunk.errors) >= size:
            return chunk
    chunk.ended = True
    return chunk


def _take_block(  # noqa: PLR0917 - take's, passed on
    chunk: Chunk, block: CsvBlock, maker: RowMaker, key: str, done: int, at: float
) -> None:
    """A block of CSV rows, made in bulk, added to `chunk` (but rows up to `done`)."""
    if block.first <= done:
        skip = done - block.first + 1
        block = block._replace(first=block.first + skip, rows=block.rows[skip:])
    if not block.rows:
        return
    made = maker.block(block, key, at)
    chunk.last = block.first + len(block.rows) - 1
    chunk.signals.extend(made.signals)
    chunk.numbers += made.numbers
    chunk.errors += made.errors
