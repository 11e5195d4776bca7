"""The local backend: each firehose's queue in segment files under `storage.dir`.

`LocalQueue` is the `Queue` of queue/base.py over a `SegmentStore` (the files and their
accounting, store.py) and the `Committer` (the group commit every queue shares,
commit.py). It decides when a batch is cut:

    append ─► group commit ─► (a stream that keeps up: cut in the same write and sync)
                             └► next_batch: cut when due ─► consumer puts ─► done

A file firehose's next file is cut, when due, while the one before it is put (one file
ahead at most): a backlog drains at the pace of the slower of the two, not of both in
turn. A stream that keeps up does not cut at all: the group commit that makes its
records durable cuts them into the batch in the same write and sync (`begin_round`).

Everything here runs on the event loop, except what is handed to a thread (`_blocking`
names and the committer's `write_round`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from firehosed import metrics
from firehosed.faults import crash_point
from firehosed.fileio import Data
from firehosed.queue.base import CutRules, Encoded, Encoder, Manifest, Position, QueueFigures
from firehosed.queue.commit import Committer, Round
from firehosed.queue.frames import Framed
from firehosed.queue.store import Pending, SegmentStore
from firehosed.record import Rows

log = structlog.get_logger(__name__)

CUT_RETRY = 1.0  # seconds: the wait before a cut that the disk failed is tried again


def _no_encoder(records: object) -> Encoded:
    raise RuntimeError("queue used before configure()")


class LocalQueue:
    """One firehose's durable queue on local disk."""

    def __init__(
        self,
        store: SegmentStore,
        committer: Committer,
        dead_dir: Path,
        quarantine_dir: Path | None = None,
    ) -> None:
        self.name = store.firehose
        self._store = store
        self._committer = committer
        self._dead_dir = dead_dir
        self._quarantine_dir = quarantine_dir
        self._dead_bytes = 0  # in dead_dir and quarantine_dir (see `recount`)
        self._rules = CutRules(stream=False, max_records=1 << 62, max_bytes=1 << 62, interval=0)
        self._encoder: Encoder = _no_encoder
        # A consumer waits in `next_batch`: `_news` ends its wait (a commit it cares
        # about, or `interrupt`); `_idle`: it waits with no deadline, so any commit is news.
        self._news = asyncio.Event()
        self._idle = False
        self._interrupted = False
        # A consumer takes batches as they come (in `next_batch` without flush): only
        # then may a group commit cut a stream's batch.
        self._consuming = False
        self._committing = False  # a group commit is writing this queue
        # Cutting, dead-lettering and replaying all number batches: one at a time.
        self._numbering = asyncio.Lock()
        # Deleting the files of the batch delivered last (runs beside the next cut).
        self._removal: asyncio.Future[None] | None = None
        # A file firehose cuts its next file while the one before is put.
        self._ahead: asyncio.Task[bool] | None = None
        # A group commit cutting this stream's next batch (see `begin_round`).
        self._round_cut: asyncio.Future[None] | None = None
        self._round_batch: tuple[Manifest, int] | None = None

    def configure(self, rules: CutRules, encoder: Encoder) -> None:
        """How batches are cut from now on (start and reload)."""
        self._rules, self._encoder = rules, encoder
        self._news.set()

    # -- appending (event loop) and the group commit ----------------------------------

    def append(self, framed: Framed, records: int) -> Round:
        """Stage framed records; the round that will make them durable."""
        if self._store.append(framed, records):
            return self._committer.mark(self)
        return self._committer.current()

    def begin_round(self) -> Pending:
        """The committer takes this queue's pending bytes (event loop); when a stream
        keeps up, its round's records (and any committed before them not yet in a batch)
        become a batch in that same write and sync (`_rounds_cut`)."""
        store = self._store
        pending = store.take_pending()
        self._committing = True
        if pending.records and self._round_cut is None and self._rounds_cut(pending.records):
            self._round_cut = asyncio.get_running_loop().create_future()
        return pending

    def write_round(self, pending: Pending, sync: bool) -> Position:
        """Write and sync a round's bytes (committer thread); cut them too when taken."""
        store = self._store
        if not pending.chunks:
            return store.committed
        return store.write(pending, sync, self if self._round_cut is not None else None)

    def end_round(self, pending: Pending, result: Position | BaseException) -> None:
        """The round was written and synced (`result` its end) or failed (event loop)."""
        store = self._store
        self._committing = False
        ok = not isinstance(result, BaseException)
        if isinstance(result, BaseException):  # (not `ok`, spelt so the type narrows)
            store.settle(pending, None)
            log.error("storage.write_failed", firehose=self.name, error=str(result))
        else:
            store.settle(pending, result)
        self._round_done(ok)
        self._commit_news()

    def _commit_news(self) -> None:
        """Wake a waiting consumer when the commit can change what it does: a stream cuts
        at once; a file firehose waiting with a deadline already has the oldest record's
        cut time, and needs waking only when the file grows to `max_bytes`. (Hundreds of
        commits a second: most must not wake it.)"""
        if self._idle or self._rules.stream or self._store.staged_bytes >= self._rules.max_bytes:
            self._news.set()

    # -- cutting a stream batch with its group commit (the store's RoundCutter) -------

    def _rounds_cut(self, records: int) -> bool:
        """Whether group commits cut this stream's batches now, `records` more with the
        next: when a consumer takes batches as they come and keeps up (none waits or is
        in flight), within the batch limits, and while nothing else numbers batches.

        The alternative is a cut of its own, a manifest file and a sync on the latency
        path of every record waiting for it.
        """
        store, rules = self._store, self._rules
        return (
            rules.stream
            and rules.interval <= 0
            and self._consuming
            and not store.batches
            and store.uncut + records <= rules.max_records
            and store.staged_bytes <= rules.max_bytes
            and not self._numbering.locked()
        )

    def cut_round(self, records: Rows, end: Position, frame_bytes: int) -> Manifest:
        """The batch of `records`, which end at `end` (commit thread)."""
        manifest, _ = self._manifest(records, end)
        self._round_batch = (manifest, frame_bytes)
        return manifest

    def _round_done(self, ok: bool) -> None:
        done, self._round_cut = self._round_cut, None
        batch, self._round_batch = self._round_batch, None
        if done is not None:
            done.set_result(None)
        if ok and batch is not None:
            self._add_batch(batch[0], 0, batch[1])

    # -- cutting ------------------------------------------------------------------------

    async def next_batch(self, *, flush: bool = False) -> Manifest | None:
        """The oldest undelivered batch, cutting one when due; waits until there is one.

        With `flush`, every committed record is due and None means nothing is left;
        None also after `interrupt()`.
        """
        store = self._store
        self._consuming = not flush
        try:
            while not self._interrupted:
                if self._round_cut is not None:
                    await asyncio.shield(self._round_cut)
                elif store.batches:
                    self._cut_ahead(flush)
                    return store.batches[0]
                elif self._ahead is not None:
                    if not await self._settle_ahead():
                        await self._wait(CUT_RETRY)
                elif store.uncut and (flush or self._cut_due()):
                    if not await self._cut_logged():
                        await self._wait(CUT_RETRY)
                elif flush:
                    return None
                else:
                    await self._wait(self._next_cut_in())
            self._interrupted = False
            return None
        finally:
            self._consuming = self._consuming and bool(store.batches)

    async def keep(self) -> None:
        """While the consumer cannot deliver (paused, destination gone): cut batches as
        they fall due, so they wait fixed on disk; return when interrupted."""
        store = self._store
        self._consuming = False
        while not self._interrupted:
            if store.uncut and self._cut_due():
                if not await self._cut_logged():
                    await self._wait(CUT_RETRY)
            else:
                await self._wait(self._next_cut_in())
        self._interrupted = False

    def interrupt(self) -> None:
        """Make a pending or the next `next_batch` return None (and stop round cuts until
        the consumer is back: it may be paused now)."""
        self._interrupted = True
        self._consuming = False
        self._news.set()

    async def seal(self) -> None:
        """Cut every committed record into batches now (a drain); a cut the disk fails
        leaves the rest staged, durable in the segments."""
        await self._settle_ahead()
        while self._store.uncut:
            try:
                if await self._cut() is None:
                    return
            except OSError as exc:
                log.error("batch.cut_failed", firehose=self.name, error=str(exc))
                return

    def _cut_ahead(self, flush: bool) -> None:
        """While the oldest file is put, cut the next one if it is due (one ahead at most)."""
        if not flush and self._ahead is None and len(self._store.batches) == 1 and self._file_due():
            self._ahead = asyncio.create_task(self._cut_logged())

    def _cut_due(self) -> bool:
        store = self._store
        if (store.pending.records or self._committing) and self._rounds_cut(store.pending.records):
            return False  # the group commit under way or next cuts them, without a sync
        return self._stream_due() if self._rules.stream else self._file_due()

    def _stream_due(self) -> bool:
        """A stream's next batch is due: at once without `max_wait`; with it, once the
        batch is full or its oldest record has waited that long."""
        store, rules = self._store, self._rules
        if rules.interval <= 0 or store.uncut >= rules.max_records:
            return True
        due_in = self._next_cut_in()
        return store.staged_bytes >= rules.max_bytes or (due_in is not None and due_in <= 0)

    def _file_due(self) -> bool:
        """A file firehose's next file is due: its time has come, or it is `max_bytes`."""
        store = self._store
        if self._rules.stream or not store.uncut:
            return False
        due_in = self._next_cut_in()
        return (due_in is not None and due_in <= 0) or store.staged_bytes >= self._rules.max_bytes

    def _next_cut_in(self) -> float | None:
        """Seconds until the next batch is due by time; None when no committed record
        waits, or a stream cuts without waiting (the next commit wakes the consumer)."""
        store, interval = self._store, self._rules.interval
        if store.staged_since is None or not store.uncut or (self._rules.stream and interval <= 0):
            return None
        return store.staged_since + interval - time.time()

    async def _wait(self, seconds: float | None) -> None:
        """Wait `seconds` (None: until news), or less if news comes."""
        self._news.clear()
        if seconds is not None and seconds <= 0:
            return
        self._idle = seconds is None
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._news.wait(), seconds)
        finally:
            self._idle = False

    async def _cut_logged(self) -> bool:
        """Cut one batch; False (logged) when the disk failed it: the records stay queued."""
        try:
            await self._cut()
        except OSError as exc:
            log.error("batch.cut_failed", firehose=self.name, error=str(exc))
            return False
        return True

    async def _settle_ahead(self) -> bool:
        """Wait for the file cut beside the last put, if any; False when the disk failed it."""
        ahead, self._ahead = self._ahead, None
        return await ahead if ahead is not None else True

    async def _cut(self) -> Manifest | None:
        """Turn the next committed records into a batch fixed on disk; None if none."""
        store = self._store
        async with self._numbering:
            if self._round_cut is not None:
                await asyncio.shield(self._round_cut)
            if store.held is not None:
                # This cut's manifest moves the cursor on disk past the batches held in
                # segments: recovery would not read their marks, so they get files.
                store.fixed(await asyncio.to_thread(store.fix_held))
            # One thread hop for read, encode and persist: it is on a stream's latency path.
            cut = await asyncio.to_thread(self._cut_blocking)
        if cut is None:
            return None
        crash_point("batch.after_cut")
        self._add_batch(*cut)
        return cut[0]

    def _cut_blocking(self) -> tuple[Manifest, int, int] | None:
        """Read the next records, encode them, fix the batch on disk (thread)."""
        store, rules = self._store, self._rules
        records, end, frame_bytes = store.read(rules.max_bytes, rules.max_records)
        if not records:
            return None
        manifest, data = self._manifest(records, end)
        return manifest, store.persist_batch(manifest, data), frame_bytes

    def _manifest(self, records: Rows, end: Position) -> tuple[Manifest, Data]:
        """The manifest of a batch of `records`, and its bytes (a thread: it encodes)."""
        store, stream = self._store, self._rules.stream
        encoded = self._encoder(records)
        unique = store.unique_name(encoded.base, records[0].received)
        manifest = store.new_manifest(
            name=encoded.prefix + unique + encoded.extension,
            base=store.state.last_name,
            suffix=store.state.name_suffix,
            named=store.state.last_named,
            records=len(records),
            size=len(encoded.data),
            opened=records[0].received,
            cut=time.time(),
            end=end,
            content_type=encoded.content_type,
            content_encoding=encoded.content_encoding,
            keys=records.keys() if stream else [],
            data=bytes(encoded.data) if stream else None,
        )
        return manifest, encoded.data

    def _add_batch(self, manifest: Manifest, freed: int, frame_bytes: int) -> None:
        self._store.add_batch(manifest, freed, frame_bytes)
        log.info(
            "batch.cut",
            firehose=self.name,
            batch=manifest.name,
            records=manifest.records,
            bytes=manifest.size,
        )

    # -- after delivery -------------------------------------------------------------------

    async def local_file(self, batch: Manifest, *, write: bool) -> Path:
        """The local file of the batch's bytes; with `write`, a stream batch's bytes (in
        its manifest) are written there once, atomically, for a channel that reads files."""
        store = self._store
        path = store.batch_path(batch)
        if write and batch.data is not None and not path.exists():
            await asyncio.to_thread(store.write_data, batch)
        return path

    async def done(self, batch: Manifest) -> None:
        """Forget a delivered batch.

        Removing its files (a rename and a directory sync) overlaps the next cut and put
        instead of delaying them (one removal in flight; a crash before it ends re-sends
        the batch, as a crash just after the put always could). A batch held in a
        segment has no files: a mark says it went, with the next group commit.
        """
        store = self._store
        if batch.start is not None:
            self._mark_done(batch)
            if not self._rules.stream:  # `local_file` wrote its bytes out for this channel
                store.batch_path(batch).unlink(missing_ok=True)
        else:
            await self._settle_removal()
            self._removal = asyncio.create_task(asyncio.to_thread(store.remove_batch, batch))
        store.drop_batch(batch)
        if batch.start is not None and store.consumed_segments():
            await self._settle_removal()
            self._removal = asyncio.create_task(self._free_segments())

    def _mark_done(self, batch: Manifest) -> None:
        self._store.mark_done(batch)
        self._committer.wake_later(self)

    async def _free_segments(self) -> None:
        """Delete the segments whose records are all delivered (no cut does it for a
        stream whose group commits cut its batches)."""
        store = self._store
        store.disk_bytes -= await asyncio.to_thread(store.delete_consumed_segments)

    async def _settle_removal(self) -> None:
        """Wait for the files of the last delivered batch to be gone."""
        removal, self._removal = self._removal, None
        if removal is None:
            return
        try:
            await removal
        except OSError as exc:  # the batch was delivered: at worst it is sent again
            log.error("batch.remove_failed", firehose=self.name, error=str(exc))

    async def dead_letter(self, batch: Manifest) -> Path:
        """Move a batch to `dead/<firehose>/`; the file holding its bytes there."""
        store = self._store
        async with self._numbering:
            if self._round_cut is not None:
                await asyncio.shield(self._round_cut)
            await asyncio.to_thread(store.move_batch, batch, self._dead_dir)
        if batch.start is not None:
            self._mark_done(batch)
        store.drop_batch(batch)
        self._dead_bytes += batch.size
        metrics.batches_dead_lettered.labels(self.name).inc()
        return self._dead_dir / f"{batch.no}.data"

    async def replay(self) -> AsyncIterator[Manifest]:
        """Take this firehose's dead-lettered batches back into delivery, oldest first."""
        store = self._store
        for source in dead_manifests(self._dead_dir):
            async with self._numbering:
                if self._round_cut is not None:
                    await asyncio.shield(self._round_cut)
                manifest = await asyncio.to_thread(store.adopt, source)
            store.add_adopted(manifest)
            self._dead_bytes = max(0, self._dead_bytes - manifest.size)
            self._news.set()
            yield manifest

    # -- figures and end ------------------------------------------------------------------

    def figures(self, now: float) -> QueueFigures:
        """What the queue holds."""
        store = self._store
        return QueueFigures(
            records=store.queued_records(),
            bytes=store.queued_bytes(),
            oldest_age=store.oldest_age(now),
            batches=len(store.batches),
            disk_bytes=store.disk_bytes,
            dead_bytes=self._dead_bytes,
        )

    def recovered_ids(self) -> list[tuple[str, float]]:
        return self._store.take_recovered()

    async def recount(self) -> None:
        """Measure the dead-letter and quarantine directories again (thread)."""
        dirs = [d for d in (self._dead_dir, self._quarantine_dir) if d is not None]
        self._dead_bytes = await asyncio.to_thread(_bytes_under, dirs)

    async def stop(self) -> None:
        """Let the cut and the removal in flight end (the consumer has stopped)."""
        await self._settle_ahead()
        await self._settle_removal()

    def close(self) -> None:
        """Close the open segment file."""
        self._store.close()


def _bytes_under(directories: list[Path]) -> int:
    """The bytes of the files in `directories` (missing ones hold none)."""
    return sum(
        path.stat().st_size
        for directory in directories
        if directory.is_dir()
        for path in directory.iterdir()
        if path.is_file()
    )


def dead_manifests(directory: Path) -> list[Path]:
    """A dead-letter directory's batch manifests, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(directory.glob("*.json"), key=lambda p: int(p.stem))


class LocalBackend:
    """Queues in `storage.dir/queues/`, dead letters in `storage.dir/dead/`, one committer."""

    def __init__(self, root: Path, segment_size: int, durability: str) -> None:
        self.root = root
        self.segment_size = segment_size
        self.sync = durability == "fsync"
        self.committer = Committer(durability)

    async def open_queue(self, name: str) -> LocalQueue:
        """Create or recover the queue of firehose `name` (blocking work in a thread)."""
        store = SegmentStore(self.root / "queues" / name, name, self.segment_size, self.sync)
        await asyncio.to_thread(store.open)
        queue = LocalQueue(
            store, self.committer, self.root / "dead" / name, self.root / "quarantine" / name
        )
        await queue.recount()
        return queue

    async def run(self) -> None:
        """The group commit, until cancelled."""
        await self.committer.run()

    async def flush(self) -> None:
        """Wait until everything appended so far is written."""
        await self.committer.flush()
