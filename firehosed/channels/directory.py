"""`directory`: write each batch as a file under a local directory.

Atomic by temp file + rename: readers never see a partial file, and a retry of the same
batch replaces the file with identical bytes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import msgspec

from firehosed.channels.base import Batch, Channel
from firehosed.errors import DeliveryError
from firehosed.faults import crash_point


class DirectoryConfig(
    msgspec.Struct, tag="directory", tag_field="type", forbid_unknown_fields=True
):
    """`type = "directory"`: files go under `path` (created when missing)."""

    path: str
    fsync: bool = True


class DirectoryChannel(Channel):
    """Writes `.NAME.part`, fsyncs it, renames it to NAME and fsyncs the directory."""

    def __init__(self, name: str, config: DirectoryConfig) -> None:
        super().__init__(name)
        self.root = Path(config.path)
        self.fsync = config.fsync

    async def put(self, batch: Batch) -> None:
        try:
            await asyncio.to_thread(self._write, batch)
        except OSError as exc:
            raise DeliveryError(f"{exc.strerror or exc} ({exc.filename or self.root})") from exc

    def _write(self, batch: Batch) -> None:
        target = self.root / batch.name
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.part")
        with open(batch.path, "rb") as src, open(part, "wb") as dst:
            dst.write(src.read(batch.size // 2))
            crash_point("channel.mid_upload")
            shutil.copyfileobj(src, dst, 1 << 20)
            if self.fsync:
                dst.flush()
                os.fsync(dst.fileno())
        os.replace(part, target)
        if self.fsync:
            fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    async def check(self) -> str:
        try:
            await asyncio.to_thread(self._check)
        except OSError as exc:
            raise DeliveryError(f"{exc.strerror or exc} ({exc.filename or self.root})") from exc
        return f"directory {self.root} is writable"

    def _check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / ".firehosed-check"
        probe.write_bytes(b"")
        probe.unlink()
