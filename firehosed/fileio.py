"""Durable file operations shared by the queue, the channels and the dead-letter store.

A write is durable once its file is fsynced; a new name (a file created or renamed into
a directory, or a new directory) is durable only once the directory holding it is
fsynced. Every helper here keeps that order, so a caller never uses a name that a power
cut could take back.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any, BinaryIO

from firehosed.faults import fail_point


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until everything is written: a nearly full disk may take part of it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


IOV_MAX = 1024  # buffers per writev (Linux's limit)

# Bytes a large file being written (an import's fetch or upload) may hold unwritten.
# Left to one fsync at its end, a 300 MB file is written out in one go, and every other
# fsync of the disk (the queue's, that a POST's answer waits for) waits 0.1 s behind it;
# a 2 GB upload, seconds.
PACE = 8 << 20

# sync_file_range(2): a range of a file written out, begun or waited for, without the
# journal commit of an fsync. Linux only; elsewhere an fdatasync stands in.
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
_sync_file_range: Any
try:
    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except (OSError, AttributeError):
    _sync_file_range = None


def write_out(fd: int, start: int, length: int, *, wait: bool) -> None:
    """Have the kernel write bytes `start` to `start + length` of a file to disk: begun,
    and with `wait` finished. Only to keep a large write from piling up unwritten: its
    fsync still makes it durable (an error here is left to that fsync to say)."""
    if _sync_file_range is None:
        if wait:
            os.fdatasync(fd)
        return
    flags = _WAIT_BEFORE | _WRITE | _WAIT_AFTER if wait else _WRITE
    _sync_file_range(fd, start, length, flags)


class Paced:
    """A file written in order, written out PACE bytes at a time as it grows: each range
    begun once written, and waited for once the next one is, so the disk works while
    the writer goes on and at most two ranges are ever unwritten. Its fsync then has
    little left to do. Blocking: call `write` in a thread."""

    __slots__ = ("_begun", "_end", "_waited", "file")

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self._waited = 0  # bytes known written out: those before the range in flight
        self._begun = 0  # where the range being written out starts
        self._end = 0  # bytes written so far

    def write(self, data: bytes | bytearray | memoryview) -> int:
        written = self.file.write(data)
        self.wrote(written)
        return written

    def wrote(self, count: int) -> None:
        """`count` more bytes went into the file (by its own writes or another's)."""
        end = self._end = self._end + count
        if end - self._begun >= PACE:
            self.file.flush()
            fd = self.file.fileno()
            if self._begun > self._waited:  # the range begun last time
                write_out(fd, self._waited, self._begun - self._waited, wait=True)
                self._waited = self._begun
            write_out(fd, self._begun, end - self._begun, wait=False)
            self._begun = end


def copy_paced(src: BinaryIO, target: Path) -> int:
    """Copy the open file `src` to `target` in the kernel (sendfile), PACE bytes at a
    time, each written out before the next is copied, then fsync `target`; the bytes
    copied."""
    with open(target, "wb") as out:
        paced = Paced(out)
        copied = 0
        while sent := os.sendfile(out.fileno(), src.fileno(), copied, PACE):
            copied += sent
            paced.wrote(sent)
        os.fsync(out.fileno())
    return copied


class Pieces:
    """A file's bytes held as the pieces they are made of (views of a queue's mapped
    segments), written with writev: a large NDJSON batch never copied into one buffer
    of new memory, whose page faults cost more than the copy."""

    __slots__ = ("pieces", "size")

    def __init__(self, pieces: list[memoryview | bytes]) -> None:
        self.pieces = pieces
        self.size = sum(map(len, pieces))

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)


# A file's bytes: in one buffer, or in pieces.
Data = bytes | Pieces


def write_chunks(fd: int, chunks: list[bytes | bytearray] | list[memoryview | bytes]) -> None:
    """`write_all` of the chunks one after another, with as few system calls as
    writev allows (a short write goes on where it stopped)."""
    views = [memoryview(chunk) for chunk in chunks if chunk]
    at = 0
    while at < len(views):
        written = os.writev(fd, views[at : at + IOV_MAX])
        while at < len(views) and written >= len(views[at]):
            written -= len(views[at])
            at += 1
        if written:
            views[at] = views[at][written:]


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (to make a rename or create in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory: the names created, renamed or removed in it become durable."""
    fail_point("fileio.dir_fsync")
    fsync_path(path)


def make_dirs(path: Path, sync: bool) -> None:
    """`mkdir -p path`, each new directory made durable (its parent fsynced) before the
    next is made inside it: `mkdir(parents=True)` alone makes several names no fsync
    covers."""
    missing: list[Path] = []
    at = path
    while not at.is_dir():
        missing.append(at)
        at = at.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            if not directory.is_dir():
                raise
        if sync:
            fsync_dir(directory.parent)


def write_synced(path: Path, data: Data, sync: bool) -> None:
    """Write `path` in place, and fsync it when `sync` (its directory entry is not)."""
    with open(path, "wb", buffering=0) as f:
        if isinstance(data, Pieces):
            write_chunks(f.fileno(), data.pieces)
        else:
            write_all(f.fileno(), data)
        if sync:
            os.fsync(f.fileno())


def write_durably(path: Path, data: bytes, sync: bool) -> None:
    """Write `path` atomically: temp file, fsync, rename, fsync directory."""
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, data, sync)
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)
