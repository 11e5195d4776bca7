"""The one small interface every channel implements.

A channel receives whole batches. A batch's name, id and bytes are fixed on disk before
its first attempt, so `put` must be idempotent: putting the same batch twice leaves one
object named `batch.name` holding `batch.path`'s bytes (temp name + rename, or one PUT).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch ready for delivery.

    `name` is relative to the channel's root (it may contain `/`, e.g. the fallback
    firehose's `{account}/Firehose/` prefix). `path` is the local file holding exactly
    the bytes to deliver. `id` is stable across retries and restarts.
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


class Channel(abc.ABC):
    """A destination. Subclasses live one per module in `firehosed/channels/`.

    `put` raises `firehosed.errors.DeliveryError` (never a library exception) on failure.
    `stream` channels want small batches as soon as records arrive (webhook, queues);
    file channels want batches cut on the firehose's schedule.
    """

    stream: ClassVar[bool] = False

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
