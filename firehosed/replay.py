"""`firehosed replay`: put dead-lettered batches back into delivery, with progress; and
what other offline commands (`firehosed archive`, daemon stopped) read of the queues.

With the daemon running, the command asks it on the admin listener
(`POST /v1/firehoses/{name}/replay`, with `[admin]`'s token; without a token, answered
only to loopback or unix-socket peers) so the running worker takes the batches;
with the daemon stopped, it moves them into the queues on disk itself, under the same
storage lock the daemon takes, and the next start delivers them.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from firehosed.config import Config
from firehosed.queue.base import Manifest
from firehosed.queue.local import dead_manifests
from firehosed.queue.store import SegmentStore


@contextmanager
def storage_lock(storage: Path) -> Iterator[bool]:
    """Hold the storage lock if it is free; yields False when a daemon holds it."""
    storage.mkdir(parents=True, exist_ok=True)
    fd = os.open(storage / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def dead_firehoses(config: Config, only: list[str] | None) -> list[str]:
    """Firehoses with dead-lettered batches, limited to `only` when given."""
    dead = Path(config.storage.dir) / "dead"
    names = sorted(p.name for p in dead.iterdir() if p.is_dir()) if dead.is_dir() else []
    return [n for n in names if not only or n in only]


def replay_offline(config: Config, firehose: str) -> Iterator[Manifest]:
    """Move one firehose's dead batches into its queue on disk (daemon stopped)."""
    storage = Path(config.storage.dir)
    queue = _store(config, firehose)
    queue.open()
    try:
        for source in dead_manifests(storage / "dead" / firehose):
            yield queue.adopt(source)
    finally:
        queue.close()


def queued_offline(config: Config, firehose: str) -> int:
    """Records in one firehose's queue on disk (daemon stopped; 0 when it has none)."""
    if not (Path(config.storage.dir) / "queues" / firehose).is_dir():
        return 0
    queue = _store(config, firehose)
    queue.open()
    try:
        return queue.queued_records()
    finally:
        queue.close()


def _store(config: Config, firehose: str) -> SegmentStore:
    return SegmentStore(
        Path(config.storage.dir) / "queues" / firehose,
        firehose,
        config.storage.segment_size,
        config.storage.durability == "fsync",
    )


def progress(manifest: Manifest) -> dict[str, Any]:
    """One progress line: which batch went back, with how many records and bytes."""
    return {"batch": manifest.name, "records": manifest.records, "bytes": manifest.size}
