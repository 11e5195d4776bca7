"""A local file read while its fetch still writes it.

A source that fetches exactly the version it listed, in order (S3: GetObject If-Match,
its body written as it comes), lets a run read a file's rows before the whole file is
on disk. The fetch writes the file from its start, in place, so every byte before the
file's current end is final; `Arriving` reads those, and a read past them waits until
more are written, up to the size the file has when whole (its listed size). The wait
looks at the file again every POLL seconds, and asks `stopped` meanwhile: once the
fetch has failed (or the daemon is gone), the bytes on disk are all there will be, and
a read past them raises `Abandoned` (the rows before it are kept; the run reads the
rest from a fetch made again).
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path

POLL = 0.01  # seconds between looks at a file that has no new bytes yet


class Abandoned(Exception):
    """The file's fetch stopped before the file was whole: no more of it will come."""


class Arriving(io.RawIOBase):
    """The file at `path`, of `size` bytes once whole, read as its bytes arrive.

    `stopped(timeout)` waits up to `timeout` seconds for the fetch to be given up, and
    says whether it was. Blocking: read it in a thread or a process of its own."""

    def __init__(self, path: Path, size: int, stopped: Callable[[float], bool]) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self._size = size
        self._at = 0
        self._stopped = stopped

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), self._size - self._at)
        if want <= 0:
            return 0
        view = memoryview(buffer).cast("B")[:want]
        while not (got := os.preadv(self._fd, [view], self._at)):
            if self._stopped(POLL):  # (bytes written just before it stopped are read)
                if not (got := os.preadv(self._fd, [view], self._at)):
                    raise Abandoned(f"its fetch stopped at byte {self._at:,}")
                break
        self._at += got
        return got

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._size}[whence]
        self._at = max(0, base + offset)
        return self._at

    def tell(self) -> int:
        return self._at

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class Arrival:
    """A file's fetch as the readers of the file see it, in the daemon: `stop` once the
    fetch stopped short. A thread reading waits on `stopped`; a reading process is told
    by the callbacks given to `on_stop` (its stdin closed)."""

    def __init__(self) -> None:
        self._stopped = threading.Event()
        self._on_stop: list[Callable[[], None]] = []

    def stop(self) -> None:
        self._stopped.set()
        for call in self._on_stop:
            call()
        self._on_stop.clear()

    def stopped(self, timeout: float) -> bool:
        """Whether the fetch stopped short, waited for up to `timeout` seconds."""
        return self._stopped.wait(timeout)

    def on_stop(self, call: Callable[[], None]) -> None:
        if self._stopped.is_set():
            call()
        else:
            self._on_stop.append(call)
