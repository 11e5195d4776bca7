"""Group commit: every request waiting in the same round shares one write+sync per queue.

Requests append to queues on the event loop; each append belongs to the committer's
open `Round`. One committer task takes everything pending, closes the round, writes and
syncs it in a worker thread, and settles the round: every request that appended to it
learns the outcome together. Requests arriving meanwhile append to the next round. So
under load the sync cost is paid once per round, not once per request, and a request
whose records span rounds (a large body yields part-way) waits for each of them.

A stream firehose that keeps up has its round's records cut into a batch in the same
write and sync (`LocalQueue.begin_round`), so its delivery starts as the requests are
answered, with no cut and no sync of its own in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import structlog

from firehosed import metrics
from firehosed.errors import StorageError
from firehosed.queue.base import Position
from firehosed.queue.store import Pending

if TYPE_CHECKING:
    from firehosed.queue.local import LocalQueue

log = structlog.get_logger(__name__)

LATER = 1.0  # seconds: the longest `wake_later` waits for a round


class Round:
    """The appends that one group commit makes durable, or fails, together."""

    __slots__ = ("_committer", "_error", "_loop", "_settled", "_waiters")

    def __init__(self, committer: Committer) -> None:
        self._committer = committer
        # Asked once per round, by its first waiter, not by every waiter: each
        # `get_running_loop()` is a getpid() system call (asyncio checks for a fork).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._settled = False
        self._error: StorageError | None = None
        # One future per waiter, so that a waiter cancelled (a client gone) cancels only
        # its own; set directly by `settle`, which wakes each waiter in one loop turn.
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        """Return once this round is durable (per `durability`); StorageError if it failed."""
        committer = self._committer
        committer.start_round()
        if committer.durability != "memory":
            await self.written()

    async def written(self) -> None:
        """Return once the committer wrote this round, whatever `durability` says."""
        if not self._settled:
            waiter = (self._loop or self._running_loop()).create_future()
            self._waiters.append(waiter)
            await waiter
        if self._error is not None:
            raise StorageError(str(self._error))

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def settle(self, error: StorageError | None) -> None:
        """The round was written (and synced), or failed with `error`: tell its waiters."""
        self._settled, self._error = True, error
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters = []


class Committer:
    """Writes pending queue bytes in rounds; `durability` decides when requests are told."""

    def __init__(self, durability: str) -> None:
        self.durability = durability
        self._dirty: dict[LocalQueue, None] = {}
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._round: Round | None = None

    def current(self) -> Round:
        """The open round: what is appended now is made durable by it."""
        if self._round is None:
            self._round = Round(self)
        return self._round

    def mark(self, queue: LocalQueue) -> Round:
        """Note that `queue` has pending bytes (call after appending); their round."""
        self._dirty[queue] = None
        return self.current()

    def start_round(self) -> None:
        """Somebody waits: commit the open round as soon as the one in flight is done."""
        self._wake.set()

    def wake_later(self, queue: LocalQueue) -> None:
        """Commit `queue`'s pending bytes with the next round, or within a second if no
        request starts one: for bookkeeping that no request waits for."""
        self._dirty[queue] = None
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LATER, self._wake_now)

    def _wake_now(self) -> None:
        self._timer = None
        self._wake.set()

    async def flush(self) -> None:
        """Wait until everything appended so far is written (and synced, per durability)."""
        this = self.current()
        self._wake.set()
        with contextlib.suppress(StorageError):
            await this.written()

    async def run(self) -> None:
        """The committer loop; runs until cancelled. A round that fails for any reason
        (a bug included) fails its requests and the loop goes on: it never dies silently.
        """
        while True:
            await self._wake.wait()
            self._wake.clear()
            this, self._round = self._round, None
            work = self._take()
            try:
                error = await self._commit(work) if work else None
            except Exception as exc:  # a bug: refuse the round's requests, keep committing
                log.exception("storage.commit_failed")
                for queue, pending in work:
                    queue.end_round(pending, exc)
                error = StorageError(f"storage commit failed: {exc.__class__.__name__}")
            if this is not None:
                this.settle(error)

    def _take(self) -> list[tuple[LocalQueue, Pending]]:
        work = [(queue, queue.begin_round()) for queue in self._dirty]
        self._dirty = {}
        return work

    async def _commit(self, work: list[tuple[LocalQueue, Pending]]) -> StorageError | None:
        started = time.perf_counter()
        results = await asyncio.to_thread(_write_all, work, self.durability == "fsync")
        metrics.fsync_seconds.observe(time.perf_counter() - started)
        error: StorageError | None = None
        for (queue, pending), result in zip(work, results, strict=True):
            queue.end_round(pending, result)
            if isinstance(result, Exception):
                detail = result.strerror if isinstance(result, OSError) else None
                error = StorageError(f"storage write failed: {detail or result}")
        # A round is all or nothing for its requests: if any queue failed, every request
        # of the round is refused and retried by its client (ids already written to other
        # queues are then delivered twice at most, never lost).
        return error


# Several queues' syncs run at once: the file system commits them together, so a
# round costs about one sync, not one per firehose.
_syncers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="firehosed-sync")


def _write_all(
    work: Sequence[tuple[LocalQueue, Pending]], sync: bool
) -> list[Position | Exception]:
    """Write each queue's pending bytes; a failure is returned in that queue's place (thread)."""
    if len(work) == 1:
        return [_write_one(work[0], sync)]
    return list(_syncers.map(lambda item: _write_one(item, sync), work))


def _write_one(item: tuple[LocalQueue, Pending], sync: bool) -> Position | Exception:
    queue, pending = item
    try:
        return queue.write_round(pending, sync)
    except Exception as exc:  # OSError from the disk; anything else is a bug, logged
        if not isinstance(exc, OSError):
            log.exception("storage.write_bug", firehose=queue.name)
        return exc
