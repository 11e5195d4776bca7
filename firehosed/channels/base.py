"""The one small interface every channel implements.

A channel receives whole batches. A batch's name, id and bytes are fixed on disk before
its first attempt, so `put` must be idempotent: putting the same batch twice leaves one
object named `batch.name` holding `batch.path`'s bytes (temp name + rename, or one PUT).
"""

from __future__ import annotations

import abc
import asyncio
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from firehosed.errors import DeliveryError


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


class Channel(abc.ABC):
    """A destination. Subclasses live one per module in `firehosed/channels/`.

    `put` raises `firehosed.errors.DeliveryError` (never a library exception) on failure.
    `stream` channels want small batches as soon as records arrive (webhook, queues);
    file channels want batches cut on the firehose's schedule. A DestinationGone error
    stops the firehose's delivery (kept queued) and alerts.
    """

    stream: ClassVar[bool] = False
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


def control_character(text: str) -> str | None:
    """The first control character (CR, LF, NUL, TAB, DEL, C1…) in `text`, or None."""
    return next((c for c in text if unicodedata.category(c) == "Cc"), None)


def path_problem(path: str) -> str | None:
    """Why `path` (a prefix or batch name) cannot go under a channel's root, or None.

    It must be relative, without `..` segments, backslashes (a separator on some FTP
    servers) or control characters (CR LF would end an FTP command, or a log line).
    """
    if (bad := control_character(path)) is not None:
        return f"contains a control character ({bad!r})"
    if "\\" in path:
        return "must not contain '\\' (a path separator on some servers)"
    if path.startswith("/"):
        return "must be a relative path (no leading '/')"
    if ".." in path.split("/"):
        return "must be a relative path without '..' segments"
    return None


def relative_name(name: str) -> str:
    """`name`, checked to stay under a channel's root (config validation already keeps
    prefixes and patterns so; this guards a manifest cut before that, or a bug). A name
    that does not is a DeliveryError retrying cannot fix: the batch is dead-lettered."""
    if (problem := path_problem(name)) is not None:
        raise DeliveryError(
            f"batch name {name!r} refused, it would lead outside the channel's root: {problem}",
            retryable=False,
        )
    return name
