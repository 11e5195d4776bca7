"""The one small interface every channel implements.

A channel receives whole batches. A batch's name, id and bytes are fixed on disk before
its first attempt, so `put` must be idempotent: putting the same batch twice leaves one
object named `batch.name` holding `batch.path`'s bytes (temp name + rename, or one PUT).

File channels (directory, sftp, ftp, ftpes, s3) are also import sources: `list_files`
and `fetch` read files from under the same root, with the same clients, credentials
and connection that delivery uses.
"""

from __future__ import annotations

import abc
import asyncio
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import BinaryIO, ClassVar

from firehosed.errors import DeliveryError, SourceChanged
from firehosed.names import GLOB, path_problem, split_pattern


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch ready for delivery.

    `name` is relative to the channel's root (it may contain `/`, e.g. the fallback
    firehose's `{account}/Firehose/` prefix). `path` is the local file holding exactly
    the bytes to deliver, except for a stream batch, whose bytes are `data` (stream
    channels call `read()`). `id` is stable across retries and restarts.
    """

    id: str
    firehose: str
    account: str
    name: str
    path: Path
    size: int
    records: int
    content_type: str
    content_encoding: str | None
    # (record id, session) per record, in file order; filled for stream channels only,
    # for per-record keys (SQS MessageDeduplicationId/MessageGroupId, Pub/Sub orderingKey).
    keys: tuple[tuple[str, str | None], ...] = ()
    data: bytes | None = None

    async def read(self) -> bytes:
        """The bytes to deliver: `data`, else the file at `path` (read in a thread)."""
        if self.data is not None:
            return self.data
        return await asyncio.to_thread(self.path.read_bytes)


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A file an import source lists.

    `name` is relative to the channel's root, '/'-separated, its directory spelled as
    the pattern spells it (what `fetch` takes). `version` changes when the content does:
    the ETag on S3 (without its quotes); elsewhere the modification time as an integer
    string, nanoseconds for `directory`, seconds for `sftp`, `ftp` and `ftpes` (what
    their protocols carry).
    """

    name: str
    size: int
    version: str


class Channel(abc.ABC):
    """A destination. Subclasses live one per module in `firehosed/channels/`.

    `put` raises `firehosed.errors.DeliveryError` (never a library exception) on failure.
    `stream` channels want small batches as soon as records arrive (webhook, queues);
    file channels want batches cut on the firehose's schedule. A DestinationGone error
    stops the firehose's delivery (kept queued) and alerts.
    """

    stream: ClassVar[bool] = False
    # A source whose `fetch(version=...)` reads only that version and writes `target` in
    # place from its start, in order: a run reads its rows as the file arrives (S3).
    streams: ClassVar[bool] = False
    # The file format a channel requires regardless of the firehose's `format`:
    # "json" (one array, e.g. webhook bodies) or "ndjson" (one record per line, split
    # into messages by queues). None: the firehose's own format.
    format: ClassVar[str | None] = None
    # A stream channel's batches hold at most `max_records` records, cut as soon as their
    # records are durable, or, with `max_wait` seconds, once that long has passed since
    # the oldest waiting record arrived (or the batch is full): fewer, fuller requests.
    max_records: int | None = None
    max_wait: float | None = None

    def __init__(self, name: str) -> None:
        self.name = name

    @abc.abstractmethod
    async def put(self, batch: Batch) -> None:
        """Deliver `batch` idempotently, or raise DeliveryError."""

    async def check(self) -> str:
        """Connect, authenticate and verify write access; return a one-line summary."""
        return "ok"

    async def close(self) -> None:  # noqa: B027 - optional hook, most channels hold nothing
        """Release connections; called on shutdown and when a reload replaces the channel."""

    async def list_files(self, pattern: str, *, account: str) -> list[RemoteFile]:
        """The files under the channel's root that `pattern` selects, sorted by name.

        `pattern` is a '/'-separated path relative to the root (`path` of directory,
        sftp, ftp and ftpes; the `prefix` of s3, its `{account}` replaced by `account`,
        which the other channels ignore). Its directories are literal; only its last
        component may hold glob characters (`*`, `?`, `[...]`, matched case-sensitively
        as `fnmatch.fnmatchcase` does); `split_pattern` says which patterns are valid.
        Listed are the regular files directly in that directory whose name matches: not
        subdirectories or their contents, not symbolic links (where the protocol tells
        them apart: an FTP server without MLSD does not), and never a name starting with
        '.' (a temp file such as `.NAME.part` being written). A directory that does not
        exist lists as no files. Raises DeliveryError when the source cannot be read.
        """
        raise self._not_a_source()

    async def fetch(
        self, name: str, target: Path, *, account: str, version: str | None = None
    ) -> int:
        """Copy the file `name` (a `RemoteFile.name`) into the local file `target`.

        `target` is created or truncated, written in chunks (never the whole file in
        memory) and fsynced before this returns (its directory is the caller's to sync).
        Returns the bytes copied. Raises DeliveryError naming the file when it is missing
        or cannot be read. Given `version` (the listed `RemoteFile.version`), raises
        SourceChanged when what was fetched is another: S3 fetches only that ETag; the
        others compare the file's modification time once it is copied (`unchanged`).
        """
        raise self._not_a_source()

    def _not_a_source(self) -> DeliveryError:
        # Channel types are one module each, named after the type (see the registry).
        kind = type(self).__module__.rpartition(".")[2]
        return DeliveryError(
            f"channel {self.name}: a {kind} channel cannot be an import source", retryable=False
        )


def relative_name(name: str, what: str = "batch name") -> str:
    """`name`, checked to stay under a channel's root (config validation already keeps
    prefixes and patterns so; this guards a manifest cut before that, or a bug). A name
    that does not is a DeliveryError retrying cannot fix: the batch is dead-lettered.
    `what` names it in the message (an import source's file is a "file name")."""
    if (problem := path_problem(name)) is not None:
        raise DeliveryError(
            f"{what} {name!r} refused, it would lead outside the channel's root: {problem}",
            retryable=False,
        )
    return name


def glob_start(glob: str) -> str:
    """The literal text `glob` starts with (before its first glob character): the part a
    server-side prefix filter (S3's Prefix) can use."""
    found = GLOB.search(glob)
    return glob if found is None else glob[: found.start()]


def selected(filename: str, glob: str) -> bool:
    """Whether a file named `filename` (no directory) in a listed directory is listed."""
    return bool(filename) and not filename.startswith(".") and fnmatchcase(filename, glob)


def source_pattern(pattern: str, where: str) -> tuple[str, str]:
    """`split_pattern(pattern)`, a refusal raised as a DeliveryError about `where` (config
    validation refuses such patterns first: this guards a bug)."""
    try:
        return split_pattern(pattern)
    except ValueError as exc:
        raise DeliveryError(f"{where}: {exc}", retryable=False) from exc


def unchanged(about: str, version: str | None, now: str) -> None:
    """Raise SourceChanged if a file fetched as `version` (its listed modification time)
    has `now` as its modification time once copied: it was written meanwhile, perhaps
    at the same size."""
    if version is not None and now != version:
        raise SourceChanged(
            f"{about}: changed since it was listed (modified at {version} then, {now} now)"
        )


def gone(about: str, why: str = "") -> SourceChanged:
    """SourceChanged for a file no longer at its source when fetched (`why`: what the
    server said, where it says it ambiguously)."""
    return SourceChanged(f"{about}: gone since it was listed{why}")


def sync_file(file: BinaryIO) -> None:
    """Flush and fsync a fetched file being written. Blocking: call it in a thread."""
    file.flush()
    os.fsync(file.fileno())


def synced_size(path: Path) -> int:
    """fsync the fetched file at `path`; its size. Blocking: call it in a thread."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())
        return os.fstat(file.fileno()).st_size


def joined(directory: str, filename: str) -> str:
    """`filename` in `directory` ("" for the root), as a `RemoteFile.name`."""
    return f"{directory}/{filename}" if directory else filename
