"""`directory`: write each batch as a file under a local directory.

Atomic by temp file + rename: readers never see a partial file, and a retry of the same
batch replaces the file with identical bytes. When the directory is on the storage
directory's file system, the part file is a hard link to the batch file (already synced
when it was cut): no byte is copied or written twice. Elsewhere it is a copy.

As an import source it lists one directory with `os.scandir` and copies a file with
`sendfile` (the kernel copies it, never through memory; written out every 8 MiB:
fileio.PACE), both in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
from pathlib import Path

import msgspec

from firehosed.channels.base import (
    Batch,
    Channel,
    RemoteFile,
    gone,
    joined,
    relative_name,
    selected,
    source_pattern,
    unchanged,
)
from firehosed.errors import DeliveryError
from firehosed.faults import crash_point
from firehosed.fileio import copy_paced, fsync_dir, fsync_path, make_dirs

# os.link errors that mean "no hard link here", not "cannot deliver"
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP}


class DirectoryConfig(
    msgspec.Struct, tag="directory", tag_field="type", forbid_unknown_fields=True
):
    """`type = "directory"`: files go under `path` (created when missing)."""

    path: str
    fsync: bool = True


class DirectoryChannel(Channel):
    """Links or writes `.NAME.part`, renames it to NAME and fsyncs the directory."""

    def __init__(self, name: str, config: DirectoryConfig) -> None:
        super().__init__(name)
        self.root = Path(config.path)
        self.fsync = config.fsync
        self.links = True

    async def put(self, batch: Batch) -> None:
        try:
            await asyncio.to_thread(self._write, batch)
        except OSError as exc:
            raise DeliveryError(f"{exc.strerror or exc} ({exc.filename or self.root})") from exc

    def _write(self, batch: Batch) -> None:
        target = self._target(batch.name)
        make_dirs(target.parent, self.fsync)
        part = target.with_name(f".{target.name}.part")
        # A part left by an earlier attempt may be a link to the batch: never write through it.
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        if self._link(batch.path, part):
            crash_point("channel.mid_upload")
            if self.fsync:  # a no-op when the batch was cut with durability = "fsync"
                fsync_path(part)
        else:
            self._copy(batch, part)
        os.replace(part, target)
        # Renaming onto a link to the same file does nothing (a retry after a crash that
        # followed the rename): the part is then still there.
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        if self.fsync:
            fsync_dir(target.parent)

    def _target(self, name: str) -> Path:
        """Where `name` goes: under the root, also once symlinks are resolved."""
        root = self.root.resolve()
        target = root / relative_name(name)
        if not target.parent.resolve().is_relative_to(root):
            raise DeliveryError(
                f"batch name {name!r} refused: a symlink leads it outside {root}",
                retryable=False,
            )
        return target

    def _link(self, source: Path, part: Path) -> bool:
        """Hard-link `source` as `part`; False where links cannot be made (then copy)."""
        if not self.links:
            return False
        try:
            os.link(source, part)
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            self.links = False  # another file system, or one without hard links
            return False
        return True

    def _copy(self, batch: Batch, part: Path) -> None:
        with open(batch.path, "rb") as src, open(part, "wb") as dst:
            dst.write(src.read(batch.size // 2))
            crash_point("channel.mid_upload")
            shutil.copyfileobj(src, dst, 1 << 20)
            if self.fsync:
                dst.flush()
                os.fsync(dst.fileno())

    async def check(self) -> str:
        try:
            await asyncio.to_thread(self._check)
        except OSError as exc:
            raise DeliveryError(f"{exc.strerror or exc} ({exc.filename or self.root})") from exc
        return f"directory {self.root} is writable"

    async def list_files(self, pattern: str, *, account: str) -> list[RemoteFile]:
        """Regular files (not symlinks) in the pattern's directory; version: st_mtime_ns."""
        directory, glob = source_pattern(pattern, f"directory {self.root}")
        try:
            return await asyncio.to_thread(self._list, directory, glob)
        except OSError as exc:
            raise self._source_error(exc) from exc

    def _list(self, directory: str, glob: str) -> list[RemoteFile]:
        found: list[RemoteFile] = []
        try:
            entries = list(os.scandir(self.root / directory))
        except (FileNotFoundError, NotADirectoryError):
            return []
        for entry in entries:
            if not (selected(entry.name, glob) and entry.is_file(follow_symlinks=False)):
                continue
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the directory was read
            name = joined(directory, entry.name)
            found.append(RemoteFile(name, stat.st_size, str(stat.st_mtime_ns)))
        return sorted(found, key=lambda file: file.name)

    async def fetch(
        self, name: str, target: Path, *, account: str, version: str | None = None
    ) -> int:
        """Copy `name` into `target` (kernel-side copy), fsync it; the bytes copied.
        SourceChanged if it was modified since its listing as `version` (st_mtime_ns):
        a file replaced by a rename meanwhile is copied as it was listed, from the inode
        opened."""
        source = self.root / relative_name(name, "file name")
        try:
            copied, modified = await asyncio.to_thread(_copy_synced, source, target)
        except FileNotFoundError as exc:
            if exc.filename != str(source):
                raise self._source_error(exc) from exc
            raise gone(f"directory {self.root}: {name}") from exc
        except OSError as exc:
            raise self._source_error(exc) from exc
        unchanged(f"directory {self.root}: {name}", version, modified)
        return copied

    def _source_error(self, exc: OSError) -> DeliveryError:
        return DeliveryError(
            f"directory {self.root}: {exc.strerror or exc} ({exc.filename or self.root})"
        )

    def _check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / ".firehosed-check"
        probe.write_bytes(b"")
        probe.unlink()


def _copy_synced(source: Path, target: Path) -> tuple[int, str]:
    """Copy `source` to `target` and fsync `target` (written out as it goes: fileio.PACE);
    its size once synced, and the source's st_mtime_ns once copied."""
    with source.open("rb") as src:
        copied = copy_paced(src, target)
        return copied, str(os.fstat(src.fileno()).st_mtime_ns)
