"""Durable file operations shared by the queue, the channels and the dead-letter store.

A write is durable once its file is fsynced; a new name (a file created or renamed into
a directory, or a new directory) is durable only once the directory holding it is
fsynced. Every helper here keeps that order, so a caller never uses a name that a power
cut could take back.
"""

from __future__ import annotations

import os
from pathlib import Path

from firehosed.faults import fail_point


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until everything is written: a nearly full disk may take part of it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


IOV_MAX = 1024  # buffers per writev (Linux's limit)


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
