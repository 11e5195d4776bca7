"""A file's rows as chunks of signals, read in a process of their own or in a thread.

Reading a CSV row and making its signal (rows.py) costs about as much CPU as all the
receiver and the queue do with it after (bench/RESULTS-imports.md). In the daemon's own
process the two take turns on one core, and take turns holding the GIL with the event
loop that answers POSTs. So a file of `PROCESS_FROM` bytes or more is read by a child
process (`import_processes` of them at most at once, `[server]`), on another core where
the machine has one; a smaller file, or one past that number, is read in a worker thread.

The child gets its `Job` (pickled, on stdin) and writes the file's chunks to stdout, each
pickled after its length. It keeps one chunk ahead of the daemon: it makes the next one
while the daemon commits the last, then waits on the pipe until it is read. It ends after
the last chunk, at a file it cannot read (a `FileError`, sent as such), or when the
daemon is gone (its next write meets a closed pipe). A child that dies (the OOM killer,
a kill -9) costs no row: the daemon logs `import.reader_lost` and reads the rest of the
file in a thread, after the last row of the chunks it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import structlog

import firehosed
from firehosed.config import FieldsConfig
from firehosed.envelope import Envelopes
from firehosed.imports.rows import (
    CsvBlock,
    FileError,
    Row,
    RowError,
    RowMaker,
    read_csv_blocks,
    read_rows,
)
from firehosed.imports.runs import now

log = structlog.get_logger(__name__)

PROCESS_FROM = 8 << 20  # bytes: a smaller file is read in a thread (a child costs ~0.15 s)
PIPE_LIMIT = 1 << 20  # bytes the daemon buffers from the child's pipe before it pauses it
LENGTH = 8  # bytes of the length before each pickled frame
# Where this very package is: the child runs it, whatever its working directory holds.
PACKAGE_ROOT = str(Path(firehosed.__file__).resolve().parent.parent)


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


class Chunk:
    """Up to `Job.size` rows of a file."""

    __slots__ = ("ended", "errors", "last", "numbers", "signals")

    def __init__(self) -> None:
        # The valid rows' signals, with their envelopes (JSON from msgspec: no newlines).
        self.signals = Envelopes([], [], [], [], [], [], None, True)
        self.numbers: list[int] = []  # the row number of each of `signals`
        self.errors: list[RowError] = []
        self.last = 0  # the number of the last row read (0: none)
        self.ended = False


class Reader:
    """The chunks of one file, in order, from a child process or (else) a thread.

    `next` is awaited once at a time; `close` ends a child still running."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.done = job.after  # the last row of the chunks taken
        self.child: asyncio.subprocess.Process | None = None
        self._rows: Iterator[Row | RowError | CsvBlock] | None = None  # the thread's
        self._maker: RowMaker | None = None

    async def spawn(self) -> None:
        """Read in a child process from now on (else: in a thread, said in the log)."""
        try:
            self.child = await _spawn(self.job)
        except OSError as exc:  # no process to be had (TasksMax, memory): a thread reads
            log.warning("import.reader_not_started", task=self.job.task, error=str(exc))
        else:
            log.info(
                "import.reader_started", task=self.job.task, file=self.job.key, pid=self.child.pid
            )

    async def next(self) -> Chunk:
        """The next chunk; FileError for a file that cannot be read."""
        if self.child is not None:
            try:
                chunk = await self._receive(self.child)
            except _Lost as lost:
                log.warning(
                    "import.reader_lost",
                    task=self.job.task,
                    file=self.job.key,
                    exit=lost.code,
                    after_row=self.done,
                )
                self.child = None
            else:
                self.done = chunk.last or self.done
                return chunk
        chunk = await asyncio.to_thread(self._take)
        self.done = chunk.last or self.done
        return chunk

    async def close(self) -> None:
        """End the child if it still runs (a run stopped or failed mid-file)."""
        child, self.child = self.child, None
        if child is None:
            return
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
        await child.wait()

    def _take(self) -> Chunk:
        if self._rows is None or self._maker is None:  # (after a lost child: from its last)
            self._rows, self._maker = _open(self.job._replace(after=self.done))
        return take(self._rows, self._maker, self.job.key, self.done, self.job.size)

    async def _receive(self, child: asyncio.subprocess.Process) -> Chunk:
        assert child.stdout is not None
        try:
            head = await child.stdout.readexactly(LENGTH)
            body = await child.stdout.readexactly(int.from_bytes(head, "little"))
        except asyncio.IncompleteReadError:
            raise _Lost(await child.wait()) from None
        kind, value = pickle.loads(body)
        if kind == "failed":
            raise FileError(value)
        if kind == "crashed":
            raise RuntimeError(f"reading {self.job.key} failed in its process:\n{value}")
        if value.ended:
            await child.wait()
        chunk: Chunk = value
        return chunk


class _Lost(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


async def _spawn(job: Job) -> asyncio.subprocess.Process:
    """A child reading `job`."""
    paths = [PACKAGE_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    code = "from firehosed.imports.reader import serve; serve()"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-P",
        "-c",
        code,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
        limit=PIPE_LIMIT,
    )
    assert child.stdin is not None
    try:
        child.stdin.write(pickle.dumps(job))
        await child.stdin.drain()
        child.stdin.close()
    except BaseException:
        child.kill()
        await child.wait()
        raise
    return child


def serve(source: BinaryIO | None = None, out: BinaryIO | None = None) -> None:
    """The child: read the job from `source`, write its chunks to `out` (stdin, stdout).
    A Ctrl-C at a terminal is the daemon's to act on: it ends the child itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    source = source or sys.stdin.buffer
    out = out or sys.stdout.buffer
    job: Job = pickle.load(source)
    try:
        _send(out, _serve(job, out))
    except BrokenPipeError:  # the daemon is gone
        with contextlib.suppress(OSError):
            os.close(out.fileno())  # no flush at exit onto the closed pipe


def _serve(job: Job, out: BinaryIO) -> tuple[str, Any]:
    """Send every chunk of `job` but the last; the last frame to send."""
    try:
        rows, maker = _open(job)
        done = job.after
        while not (chunk := take(rows, maker, job.key, done, job.size)).ended:
            _send(out, ("chunk", chunk))
            done = chunk.last or done
    except FileError as exc:
        return "failed", str(exc)
    except BrokenPipeError:
        raise
    except Exception:
        return "crashed", traceback.format_exc()
    return "chunk", chunk


def _send(out: BinaryIO, frame: tuple[str, Any]) -> None:
    data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(len(data).to_bytes(LENGTH, "little"))
    out.write(data)
    out.flush()


def _open(job: Job) -> tuple[Iterator[Row | RowError | CsvBlock], RowMaker]:
    """A file's rows for `take` (CSV's in blocks of `job.size` rows, made in bulk), and
    the maker of their signals."""
    if job.format == "csv":
        rows: Iterator[Row | RowError | CsvBlock] = read_csv_blocks(job.path, job.size)
    else:
        rows = read_rows(job.path, job.format, after=job.after)
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
