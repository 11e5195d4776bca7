"""Group commit: every request waiting in the same round shares one write+sync per queue.

Requests append to queues on the event loop and await `commit()`. One committer task
takes everything pending, writes and syncs it in a worker thread, and wakes all those
requests together; requests arriving meanwhile form the next group. So under load the
sync cost is paid once per group, not once per request.

A stream firehose that keeps up has its group's records cut into a batch in the same
write and sync (the queue's `cutter`, see `Worker.take_round`), so its delivery starts
as the requests are answered, with no cut and no sync of its own in between.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import structlog

from firehosed import metrics
from firehosed.errors import StorageError
from firehosed.queue.store import FirehoseQueue, Pending, RoundCutter

log = structlog.get_logger(__name__)

LATER = 1.0  # seconds: the longest `wake_later` waits for a round


class Committer:
    """Writes pending queue bytes in groups; `durability` decides when requests are told."""

    def __init__(self, durability: str) -> None:
        self.durability = durability
        self._dirty: dict[FirehoseQueue, None] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    def mark(self, queue: FirehoseQueue) -> None:
        """Note that `queue` has pending bytes (call after `queue.append`)."""
        self._dirty[queue] = None

    def wake_later(self, queue: FirehoseQueue) -> None:
        """Commit `queue`'s pending bytes with the next round, or within a second if no
        request starts one: for bookkeeping that no request waits for."""
        self._dirty[queue] = None
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LATER, self._wake_now)

    def _wake_now(self) -> None:
        self._timer = None
        self._wake.set()

    async def commit(self) -> None:
        """Wait until everything appended so far is durable (per `durability`)."""
        if self.durability == "memory":
            self._wake.set()
            return
        await self.flush()

    async def flush(self) -> None:
        """Wait until everything appended so far is written (and synced, per durability)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        await waiter

    async def run(self) -> None:
        """The committer loop; runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._dirty:
                self._release(self._waiters, None)
                self._waiters = []
                continue
            await self._round()

    async def _round(self) -> None:
        work = [(q, q.take_pending()) for q in self._dirty]
        cutters = [
            q.cutter if q.cutter is not None and q.cutter.take_round(p) else None for q, p in work
        ]
        waiters, self._waiters = self._waiters, []
        self._dirty = {}
        for queue, _ in work:
            queue.committing = True
        started = time.perf_counter()
        results = await asyncio.to_thread(_write_all, work, cutters, self.durability == "fsync")
        metrics.fsync_seconds.observe(time.perf_counter() - started)
        error: StorageError | None = None
        for (queue, pending), cutter, result in zip(work, cutters, results, strict=True):
            ok = not isinstance(result, OSError)
            queue.committing = False
            if isinstance(result, OSError):  # (not `ok`, spelt so the type narrows)
                queue.rollback(pending)
                log.error("storage.write_failed", firehose=queue.firehose, error=str(result))
                error = StorageError(f"storage write failed: {result.strerror or result}")
            else:
                queue.committed = result
                queue.uncut += pending.records
                queue.disk_bytes += len(pending.data)
            if cutter is not None:
                cutter.round_done(ok)
            if queue.on_commit is not None:  # a failure too: a worker may wait for it
                queue.on_commit()
        # A group is all or nothing for its requests: if any queue failed, every request
        # of the group is refused and retried by its client (ids already written to other
        # queues are then delivered twice at most, never lost).
        self._release(waiters, error)

    @staticmethod
    def _release(waiters: list[asyncio.Future[None]], error: Exception | None) -> None:
        for waiter in waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)


# Several queues' syncs run at once: the file system commits them together, so a
# round costs about one sync, not one per firehose.
_syncers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="firehosed-sync")


def _write_all(
    work: list[tuple[FirehoseQueue, Pending]], cutters: list[RoundCutter | None], sync: bool
) -> list[tuple[int, int] | OSError]:
    """Write each queue's pending bytes; a failure is returned in that queue's place (thread)."""
    if len(work) == 1:
        return [_write_one(work[0], cutters[0], sync)]
    return list(_syncers.map(lambda item, cutter: _write_one(item, cutter, sync), work, cutters))


def _write_one(
    item: tuple[FirehoseQueue, Pending], cutter: RoundCutter | None, sync: bool
) -> tuple[int, int] | OSError:
    queue, pending = item
    try:
        return queue.write(pending, sync, cutter) if pending.data else queue.committed
    except OSError as exc:
        return exc
