"""A file's rows as chunks of signals, read in a process of their own or in a thread.

Reading a CSV row and making its signal (rows.py) costs about as much CPU as all the
receiver and the queue do with it after (bench/RESULTS-imports.md). In the daemon's own
process the two take turns on one core, and take turns holding the GIL with the event
loop that answers POSTs. So a file of `PROCESS_FROM` bytes or more is read by a child
process (`import_processes` of them at most at once, `[server]`), on another core where
the machine has one; a smaller file, or one past that number, is read in a worker thread.

The child (child.py) gets its `Job` (pickled, on stdin) and writes the file's chunks to
stdout, each a msgpack `Frame` after its length. It keeps ahead of the daemon: it makes
the next chunks while the daemon commits the last ones, then waits on the pipe until
they are read. It ends after the last chunk, at a file it cannot read (a `FileError`, sent as
such), or when the daemon is gone (its next write meets a closed pipe). A child that
dies (the OOM killer, a kill -9) costs no row: the daemon logs `import.reader_lost` and
reads the rest of the file in a thread, after the last row of the chunks it took.

A file still being fetched (`Job.arriving`, importer.py) is read as it arrives
(arriving.py), by a child or a thread alike; when its fetch stops short, the reader
ends with Abandoned after the rows of the bytes on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import structlog

import firehosed
from firehosed.imports.arriving import Abandoned, Arrival
from firehosed.imports.child import FRAMES, LENGTH, Chunk, Job, open_rows, take
from firehosed.imports.rows import CsvBlock, FileError, Row, RowError, RowMaker

log = structlog.get_logger(__name__)

PROCESS_FROM = 8 << 20  # bytes: a smaller file is read in a thread (a child costs ~0.15 s)
PIPE_LIMIT = 1 << 20  # bytes the daemon buffers from the child's pipe before it pauses it
# Where this very package is: the child runs it, whatever its working directory holds.
PACKAGE_ROOT = str(Path(firehosed.__file__).resolve().parent.parent)


class Reader:
    """The chunks of one file, in order, from a child process or (else) a thread.

    `next` is awaited once at a time; `close` ends a child still running. A file still
    arriving (`job.arriving`) is read as its `arrival` lets it: `next` raises Abandoned
    after the rows on disk once its fetch stopped short."""

    def __init__(self, job: Job, arrival: Arrival | None = None) -> None:
        assert (job.arriving is None) == (arrival is None), "a file arriving has its arrival"
        self.job = job
        self.arrival = arrival
        self.done = job.after  # the last row of the chunks taken
        self.child: asyncio.subprocess.Process | None = None
        self._rows: Iterator[Row | RowError | CsvBlock] | None = None  # the thread's
        self._maker: RowMaker | None = None

    async def spawn(self) -> None:
        """Read in a child process from now on (else: in a thread, said in the log)."""
        try:
            self.child = await _spawn(self.job, self.arrival)
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
                    error=lost.error,
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
        if child.stdin is not None:  # (open still if the file was arriving)
            child.stdin.close()
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
        await child.wait()

    def _take(self) -> Chunk:
        if self._rows is None or self._maker is None:  # (after a lost child: from its last)
            stopped = None if self.arrival is None else self.arrival.stopped
            self._rows, self._maker = open_rows(self.job._replace(after=self.done), stopped)
        return take(self._rows, self._maker, self.job.key, self.done, self.job.size)

    async def _receive(self, child: asyncio.subprocess.Process) -> Chunk:
        assert child.stdout is not None
        try:
            head = await child.stdout.readexactly(LENGTH)
            body = await child.stdout.readexactly(int.from_bytes(head, "little"))
        except asyncio.IncompleteReadError:
            raise _Lost(await child.wait()) from None
        try:
            frame = FRAMES.decode(body)
        except msgspec.DecodeError as exc:
            # Bytes the child did not send as they came (the pipe written by another
            # process, a debugger attached mid-write): none of it is taken; the thread
            # reads on from the last chunk that came whole.
            await self.close()
            raise _Lost(await child.wait(), f"its output could not be read: {exc}") from None
        if frame.kind == "failed":
            raise FileError(frame.message)
        if frame.kind == "abandoned":
            await child.wait()
            raise Abandoned(frame.message)
        if frame.kind == "crashed" or frame.chunk is None:
            # A bug in reading: a thread would meet it again. The file fails with the
            # error's last line; the whole traceback goes to the log.
            log.error(
                "import.reader_crashed", task=self.job.task, file=self.job.key, error=frame.message
            )
            await child.wait()
            last = (frame.message or "no message").strip().splitlines()[-1]
            raise FileError(f"reading failed (a bug; import.reader_crashed in the log): {last}")
        if frame.chunk.ended:
            await child.wait()
        return frame.chunk


class _Lost(Exception):
    """The child is gone (its exit status), or was ended for what it sent (`error`)."""

    def __init__(self, code: int, error: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.error = error


async def _spawn(job: Job, arrival: Arrival | None) -> asyncio.subprocess.Process:
    """A child reading `job`; its stdin stays open while the file arrives (`arrival`)."""
    paths = [PACKAGE_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    code = "from firehosed.imports.child import serve; serve()"
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
        if arrival is None:
            child.stdin.close()
        else:
            arrival.on_stop(child.stdin.close)
    except BaseException:
        child.kill()
        await child.wait()
        raise
    return child
