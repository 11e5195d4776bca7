"""The queue interface: what ingest and delivery may ask of a queue backend.

A backend keeps each firehose's records durably, from the request that appends them to
the delivery that confirms them. The contract every backend keeps (and the suite in
`tests/test_queue_contract.py` checks):

- `append` stages framed records and returns the `Commit` that will make them durable;
  a request answers 202 only after `Commit.wait()` returned, and 503 when it raised.
  Records of one request may go into several commits: it waits for each (`Ticket`).
- `next_batch` cuts records into a batch with the encoder it was given, and fixes the
  batch's name, id and bytes before returning it, so that after a crash the same batch
  comes back with the same name and bytes. Batches come oldest first; records keep
  their order inside a batch.
- `done` forgets a delivered batch; `dead_letter` moves a batch out of delivery into
  the dead-letter store; `replay` brings dead batches back.
- All of a queue's accounting is its own: others read `figures()`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgspec

from firehosed.fileio import Data
from firehosed.queue.frames import Framed
from firehosed.record import Rows

# Where in a backend's log. On local disk (segment, offset, skip): the frame at `offset`
# of segment `segment`, past its first `skip` records (a cut may end inside a request's
# block). Written before blocks existed as (segment, offset): read as skip 0.
Position = tuple[int, ...]


def position(at: Position) -> Position:
    """`at` as (segment, offset, skip)."""
    return at if len(at) == 3 else (at[0], at[1], 0)


class Manifest(msgspec.Struct, kw_only=True):
    """A cut batch, fixed durably before its first delivery attempt."""

    no: int
    id: str
    name: str
    records: int
    size: int
    opened: float
    cut: float
    end: Position
    content_type: str
    content_encoding: str | None = None
    keys: list[tuple[str, str | None]] = msgspec.field(default_factory=list)
    # The naming state after this batch (state.json may lag behind the newest manifest):
    # see `unique_name`. (`named` is 0 in a manifest from before it was kept.)
    base: str = ""
    suffix: int = 0
    named: float = 0.0
    # A stream batch's bytes, held in its manifest (there is no .data file).
    data: bytes | None = None
    # Set for a stream batch cut with its records' group commit: its records lie between
    # `start` and `end` in the segments, its manifest is a mark right after them (at
    # `end`), and it has no .json file unless one is written for it later.
    start: Position | None = None

    def __post_init__(self) -> None:
        self.end = position(self.end)
        if self.start is not None:
            self.start = position(self.start)


@dataclass(frozen=True, slots=True)
class Naming:
    """How a queue's last batch was named: the base, its suffix, and the time the name
    stands for (never earlier than an earlier batch's)."""

    base: str = ""
    suffix: int = 0
    named: float = 0.0


def unique_name(base: str, opened: float, last: Naming) -> tuple[str, Naming]:
    """The unique part of a batch's name, and the naming after it.

    `base` is the batch's time-derived name (the encoder's, of `opened`: when its first
    record was received). A name is never reused: the same base as the last batch's gets
    the next suffix; and a batch whose first record is older than the last batch's name
    (a catch-up copy of a signal named in an earlier batch; with several processes, a
    partition routed late) would name a time already named, perhaps the very file of an
    earlier batch, which its upload would replace: it takes the last batch's base and
    the next suffix instead.
    """
    if base == last.base or opened < last.named:
        suffix = last.suffix + 1
        return f"{last.base}-{suffix}", Naming(last.base, suffix, max(opened, last.named))
    return base, Naming(base, 0, opened)


@dataclass(frozen=True, slots=True)
class Encoded:
    """One batch's bytes and how it is named, from the firehose's encoder."""

    data: Data
    base: str  # the time-derived part of the name; the queue makes it unique
    prefix: str
    extension: str
    content_type: str
    content_encoding: str | None


# Encodes a batch's records (in a worker thread): the firehose's format and naming.
Encoder = Callable[[Rows], Encoded]


@dataclass(frozen=True, slots=True)
class CutRules:
    """When a queue cuts a batch, and how large it may be."""

    stream: bool  # small batches for a stream channel (webhook, queues), else files
    max_records: int
    max_bytes: int  # of the records' raw bytes
    # Seconds a batch stays open for more records: a file firehose's schedule; a stream's
    # `max_wait` (0: cut as soon as records are durable).
    interval: float


@dataclass(frozen=True, slots=True)
class QueueFigures:
    """What a queue holds right now."""

    records: int  # not yet delivered (staged and in batches)
    bytes: int  # their bytes: staged frames plus batch files
    oldest_age: float  # seconds since the oldest undelivered record arrived
    batches: int  # cut batches awaiting delivery
    disk_bytes: int  # what the queue takes on its storage
    dead_bytes: int  # what it keeps out of delivery: dead letters and quarantined records


class Commit(Protocol):
    """A group of appends that becomes durable (or fails) together."""

    async def wait(self) -> None:
        """Return once the appends are durable; raise StorageError if they never will be."""


class Ticket:
    """The commits one request's records went into: it is kept only if all of them are."""

    __slots__ = ("_commits",)

    def __init__(self) -> None:
        self._commits: list[Commit] = []

    def add(self, commit: Commit) -> None:
        """Note a commit (in append order; a run of appends shares one)."""
        if not self._commits or self._commits[-1] is not commit:
            self._commits.append(commit)

    def __bool__(self) -> bool:
        return bool(self._commits)

    def wait(self) -> Awaitable[None]:
        """Every commit durable; StorageError at the first that failed. (Not a coroutine
        of its own: the common request has one commit, awaited directly.)"""
        commits = self._commits
        return commits[0].wait() if len(commits) == 1 else self._wait_each(commits)

    @staticmethod
    async def _wait_each(commits: list[Commit]) -> None:
        for commit in commits:
            await commit.wait()


class Queue(Protocol):
    """One firehose's durable queue."""

    name: str

    def configure(self, rules: CutRules, encoder: Encoder) -> None:
        """How batches are cut from now on (start and reload)."""

    def append(self, framed: Framed, records: int) -> Commit:
        """Stage framed records (event loop); the commit that will make them durable."""

    async def next_batch(self, *, flush: bool = False) -> Manifest | None:
        """The oldest undelivered batch, cutting one when due; waits until there is one.

        With `flush`, everything committed is due, and None means nothing is left. None
        also when `interrupt()` was called.
        """

    async def keep(self) -> None:
        """While the consumer cannot deliver: cut batches as they fall due; return when
        interrupted."""

    def interrupt(self) -> None:
        """Make a pending or the next `next_batch` return None (the consumer's state changed)."""

    async def seal(self) -> None:
        """Cut every committed record into batches now (a drain)."""

    async def local_file(self, batch: Manifest, *, write: bool) -> Path:
        """The local file of the batch's bytes; with `write`, made to hold them if the
        batch keeps them elsewhere (a stream batch, for a channel that reads files)."""

    async def done(self, batch: Manifest) -> None:
        """Forget a delivered batch for good."""

    async def dead_letter(self, batch: Manifest) -> Path:
        """Move a batch to the dead-letter store; the file holding its bytes there."""

    def replay(self) -> AsyncIterator[Manifest]:
        """Take the dead-lettered batches back into delivery, oldest first; raises
        NotHere when another process of a scaled-out backend cuts this firehose."""

    def figures(self, now: float) -> QueueFigures:
        """What the queue holds."""

    def recovered_ids(self) -> list[tuple[str, float]]:
        """(id, received) of the records found undelivered when the queue was opened,
        received within a minute of the newest: for dedupe, so that a retry of a request
        whose answer a crash cut off is a duplicate. Given once; then empty."""

    async def recount(self) -> None:
        """Measure again what it keeps out of delivery (an operator may have removed
        dead letters or quarantined records by hand)."""

    async def stop(self) -> None:
        """Let work in flight beside the consumer end (it has stopped)."""

    def close(self) -> None:
        """Release files (after the last consumer stopped)."""


class Backend(Protocol):
    """Where queues live, and the group commit that serves them all."""

    async def open_queue(self, name: str) -> Queue:
        """Create or recover the queue of firehose `name`."""

    async def run(self) -> None:
        """Commit appends until cancelled (a task the daemon supervises)."""

    async def flush(self) -> None:
        """Wait until everything appended so far is written (a drain)."""
