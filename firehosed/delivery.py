"""The delivery worker of one firehose: cut batches, put them, retry, dead-letter, alert.

One worker per firehose, one batch in flight at a time, oldest first:

    wait for work ─► cut a batch when due ─► channel.put(batch)
                                               ├─ ok: forget the batch, count, maybe "recovered"
                                               ├─ DeliveryError: back off (full jitter), alert
                                               │   after alert_after, dead-letter after retry_for
                                               └─ DestinationGone: stop delivering, alert

A file firehose cuts its next file, when it is due, while the one before it is put: a
backlog drains at the pace of the slower of the two, not of both in turn. A stream that
keeps up does not cut: the group commit that makes its records durable cuts them into
the batch in the same write and sync (`take_round`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from firehosed import formats, metrics
from firehosed.alerts import Alerts, Incident
from firehosed.channels.base import Batch, Channel
from firehosed.errors import DeliveryError, DestinationGone
from firehosed.faults import crash_point
from firehosed.firehose import Firehose
from firehosed.queue.store import Manifest, Pending, Position
from firehosed.record import Record

log = structlog.get_logger(__name__)

BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
STREAM_MAX_BYTES = 8 << 20


def backoff(attempt: int, retry_after: float | None) -> float:
    """Full-jitter exponential backoff (base 1 s, cap 5 min), never below `retry_after`."""
    delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
    return max(delay, retry_after or 0.0)


@dataclass(slots=True)
class Outcome:
    """When and what: the last delivery or the last error of a worker."""

    at: float
    what: str


class Worker:
    """Delivers one firehose's queue to its channel until stopped."""

    def __init__(
        self, firehose: Firehose, channel: Channel, dead_dir: Path, alerts: Alerts
    ) -> None:
        self.firehose = firehose
        self.channel = channel
        self.dead_dir = dead_dir
        self.alerts = alerts
        # `wake`: new records committed (idle waits end). `_control`: stop, drain, reload
        # or replay (backoff waits end too: new data must not shorten a backoff).
        self.wake = asyncio.Event()
        # Waiting with no deadline: only a commit or a nudge can give the loop work.
        self._idle = False
        self._control = asyncio.Event()
        # Where dead-lettered batches are also copied (`dead_letter` key), if anywhere.
        self.dead_channel: Channel | None = None
        self.stopping = False
        self.draining = False
        self.retiring = False
        self.gone: str | None = None
        self.last_delivery: Outcome | None = None
        self.last_error: Outcome | None = None
        self._failing_since: float | None = None
        self._alerted = False
        # Cutting and replaying both number new batches: one at a time.
        self._numbering = asyncio.Lock()
        # Deleting the files of the batch delivered last (runs beside the next cut).
        self._removal: asyncio.Future[None] | None = None
        # A file firehose cuts its next file while the one before is put (`_loop`).
        self._ahead: asyncio.Task[bool] | None = None
        # A group commit cutting this stream's next batch (see `take_round`).
        self._round_cut: asyncio.Future[None] | None = None
        self._round_batch: tuple[Manifest, int] | None = None

    @property
    def name(self) -> str:
        return self.firehose.name

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Cut and deliver until `stop()`, or until a drain or retirement is finished.

        This loop is the only place that cuts and delivers, so one batch is never in
        flight twice.
        """
        try:
            await self._loop()
        finally:
            await self._settle_ahead()
            await self._settle_removal()

    async def _loop(self) -> None:
        queue = self.firehose.queue
        while not self.stopping:
            deliverable = bool(queue.batches) and self._may_deliver()
            if self._cut_due() or (self._ahead is not None and not deliverable):
                # A cut under way beside the last put is the one that was due.
                cut = self._settle_ahead() if self._ahead is not None else self._cut_logged()
                if not await cut:
                    await self._sleep(1.0)
                continue
            if deliverable:
                if self._ahead is None and len(queue.batches) == 1 and self._file_due():
                    self._ahead = asyncio.create_task(self._cut_logged())
                await self._deliver(queue.batches[0])
                continue
            if self._finished():
                return
            await self._sleep(self._next_cut_in())

    async def _cut_logged(self) -> bool:
        """`cut()`; False (logged) when the disk failed it: the records stay queued."""
        try:
            await self.cut()
        except OSError as exc:
            log.error("batch.cut_failed", firehose=self.name, error=str(exc))
            return False
        return True

    async def _settle_ahead(self) -> bool:
        """Wait for the file being cut while the batch before it was put, if any; False
        when the disk failed that cut (as `_cut_logged`)."""
        ahead, self._ahead = self._ahead, None
        return await ahead if ahead is not None else True

    def _finished(self) -> bool:
        """Draining: nothing left that can be delivered now. Retiring: nothing left at all."""
        queue = self.firehose.queue
        if queue.uncut:
            return False
        if self.draining:
            return not queue.batches or not self._may_deliver()
        return self.retiring and not queue.batches

    def _may_deliver(self) -> bool:
        return not self.firehose.config.paused and self.gone is None

    def _cut_due(self) -> bool:
        queue = self.firehose.queue
        if not queue.uncut:
            return False
        if (queue.pending.records or queue.committing) and self._rounds_cut(queue.pending.records):
            return False  # the group commit under way or next cuts them, without a sync
        if self.draining or self.retiring:  # cut everything: open batches get their files
            return not self.channel.stream or not queue.batches or not self._may_deliver()
        if queue.batches and self._may_deliver():
            # The oldest batch goes first. A backlog (a restart with a large queue, the
            # end of an outage) is cut one file ahead of the put (`_loop`), so delivery
            # resumes with the first file, not after the last one is cut.
            return False
        return self.channel.stream or self._file_due()

    def _file_due(self) -> bool:
        """A file firehose's next file is due: its time has come, or it is `max_file`."""
        queue = self.firehose.queue
        if self.channel.stream or not queue.uncut:
            return False
        due_in = self._next_cut_in()
        return (
            due_in is not None and due_in <= 0
        ) or queue.staged_bytes >= self.firehose.config.max_file

    def _next_cut_in(self) -> float | None:
        """Seconds until the next file is due; None when no committed record waits (the
        next commit wakes the loop, see `committed`)."""
        queue = self.firehose.queue
        if queue.staged_since is None or self.channel.stream:
            return None
        if not queue.uncut:  # staged, not yet durable
            return None
        interval = self.firehose.config.minutes_between_files * 60.0
        return queue.staged_since + interval - time.time()

    async def _sleep(self, seconds: float | None) -> None:
        """Wait `seconds` (None: until woken), or less if records arrive or we are nudged."""
        self.wake.clear()
        if seconds is not None and seconds <= 0:
            return
        self._idle = seconds is None
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), seconds)
        finally:
            self._idle = False

    def committed(self) -> None:
        """The queue's committer ended a group commit that wrote to it (its `on_commit`).

        Called once per group commit, hundreds of times a second under load, so the loop
        is woken only when the news can change what it does: a stream cuts at once; a
        file firehose waiting with a deadline already has the oldest record's cut time,
        and needs waking only when the file grows to `max_file`.
        """
        if (
            self._idle
            or self.channel.stream
            or self.draining
            or self.retiring
            or self.firehose.queue.staged_bytes >= self.firehose.config.max_file
        ):
            self.wake.set()

    async def _back_off(self, seconds: float) -> None:
        """Wait out a retry delay; only `nudge()` (stop, drain, reload, replay) cuts it short."""
        self._control.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._control.wait(), seconds)

    def nudge(self) -> None:
        """Wake the loop, even from a backoff: its settings or its task changed."""
        self._control.set()
        self.wake.set()

    def stop(self) -> None:
        """Ask the loop to end after the current step."""
        self.stopping = True
        self.nudge()

    # -- cutting ----------------------------------------------------------------------

    async def cut(self) -> Manifest | None:
        """Turn the next committed records into a batch fixed on disk; None if none."""
        async with self._numbering:
            await self._round_settled()
            queue = self.firehose.queue
            if queue.held is not None:
                # This cut's manifest moves the cursor on disk past the batches held in
                # segments: recovery would not read their marks, so they get files.
                queue.fixed(await asyncio.to_thread(queue.fix_held))
            return await self._cut()

    async def _round_settled(self) -> None:
        """Wait for a group commit that is cutting this stream's next batch, if any.

        Holding `_numbering` keeps another from starting; state.json, a cut's manifest
        and a replayed batch must not be numbered or written while one is in flight.
        """
        if self._round_cut is not None:
            await asyncio.shield(self._round_cut)

    async def _cut(self) -> Manifest | None:
        config = self.firehose.config
        stream = self.channel.stream
        limit_records = (self.channel.max_records or 500) if stream else 1 << 62
        limit_bytes = STREAM_MAX_BYTES if stream else config.max_file
        # One thread hop for read, encode and persist: it is on a stream's latency path.
        cut = await asyncio.to_thread(self._cut_blocking, limit_bytes, limit_records)
        if cut is None:
            return None
        manifest, freed, frame_bytes = cut
        crash_point("batch.after_cut")
        self._add_batch(manifest, freed, frame_bytes)
        return manifest

    def _add_batch(self, manifest: Manifest, freed: int, frame_bytes: int) -> None:
        self.firehose.queue.add_batch(manifest, freed, frame_bytes)
        log.info(
            "batch.cut",
            firehose=self.name,
            batch=manifest.name,
            records=manifest.records,
            bytes=manifest.size,
        )

    def _cut_blocking(
        self, limit_bytes: int, limit_records: int
    ) -> tuple[Manifest, int, int] | None:
        """Read the next records, encode them, fix the batch on disk (worker thread)."""
        queue = self.firehose.queue
        records, end, frame_bytes = queue.read(limit_bytes, limit_records)
        if not records:
            return None
        manifest, data = self._manifest(records, end)
        return manifest, queue.persist_batch(manifest, data), frame_bytes

    def _manifest(self, records: list[Record], end: Position) -> tuple[Manifest, bytes]:
        """The manifest of a batch of `records`, and its bytes (a thread: it encodes)."""
        queue, config = self.firehose.queue, self.firehose.config
        stream = self.channel.stream
        fmt = self.channel.format or config.format
        compression = "none" if stream else config.compression
        data = formats.encode(fmt, records, self.firehose.mapping, compression)
        opened = records[0].received
        base = datetime.fromtimestamp(opened, UTC).strftime(config.filename_pattern)
        name = queue.unique_name(base)
        manifest = queue.new_manifest(
            name=config.prefix + name + formats.extension(fmt, compression),
            base=queue.state.last_name,
            suffix=queue.state.name_suffix,
            records=len(records),
            size=len(data),
            opened=opened,
            cut=time.time(),
            end=end,
            content_type=formats.CONTENT_TYPES[fmt],
            content_encoding="gzip" if compression == "gzip" else None,
            keys=[(r.id, r.session) for r in records] if stream else [],
            data=data if stream else None,
        )
        return manifest, data

    # -- cutting a stream batch with its group commit (the queue's RoundCutter) -------

    def take_round(self, pending: Pending) -> bool:
        """Whether a group commit's records (and any committed before them not yet in a
        batch) become a stream batch in that commit: the batch's manifest is written
        and synced with the records, and its delivery starts as the requests are told.
        """
        if not (pending.records and self._round_cut is None and self._rounds_cut(pending.records)):
            return False
        self._round_cut = asyncio.get_running_loop().create_future()
        return True

    def _rounds_cut(self, records: int) -> bool:
        """Whether group commits cut this stream's batches now, `records` more with the
        next: when it keeps up (no batch waits or is in flight), within the channel's
        limits, and while no cut, replay or dead-lettering is numbering batches.

        The alternative is a cut of its own, a manifest file and a sync on the latency
        path of every record waiting for it.
        """
        queue = self.firehose.queue
        return (
            self.channel.stream
            and not queue.batches
            and queue.uncut + records <= (self.channel.max_records or 500)
            and queue.staged_bytes <= STREAM_MAX_BYTES
            and self._may_deliver()
            and not (self.stopping or self.draining or self.retiring)
            and not self._numbering.locked()
        )

    def cut_round(self, records: list[Record], end: Position, frame_bytes: int) -> Manifest:
        manifest, _ = self._manifest(records, end)
        self._round_batch = (manifest, frame_bytes)
        return manifest

    def round_done(self, ok: bool) -> None:
        done, self._round_cut = self._round_cut, None
        batch, self._round_batch = self._round_batch, None
        if done is not None:
            done.set_result(None)
        if not ok or batch is None:
            return
        manifest, frame_bytes = batch
        self._add_batch(manifest, 0, frame_bytes)

    # -- delivering -------------------------------------------------------------------

    async def _deliver(self, manifest: Manifest) -> None:
        """Put one batch, retrying with backoff until delivered, dead-lettered or stopped."""
        attempt = 0
        while not self.stopping and self._may_deliver():
            try:
                await self._put(manifest)
            except DestinationGone as exc:
                self._gone(exc)
                return
            except DeliveryError as exc:
                if await self._failed(manifest, exc):
                    return
                await self._back_off(backoff(attempt, exc.retry_after))
                attempt += 1
                continue
            except Exception as exc:  # a channel bug must not kill the worker: retry it
                log.exception(
                    "channel.unexpected_error", firehose=self.name, channel=self.channel.name
                )
                if await self._failed(
                    manifest, DeliveryError(f"unexpected {exc.__class__.__name__}: {exc}")
                ):
                    return
                await self._back_off(backoff(attempt, None))
                attempt += 1
                continue
            await self._delivered(manifest)
            return

    async def _put(self, manifest: Manifest) -> None:
        """One attempt, bounded by `delivery_timeout` (a stalled server must not hang us)."""
        limit = self.firehose.config.delivery_timeout
        queue = self.firehose.queue
        # A stream batch, and a reload gave the firehose a channel that reads files:
        # written out once (atomically), not on every retry.
        if (
            not self.channel.stream
            and manifest.data is not None
            and not queue.batch_path(manifest).exists()
        ):
            await asyncio.to_thread(queue.write_data, manifest)
        try:
            async with asyncio.timeout(limit):
                await self.channel.put(self._batch(manifest))
        except TimeoutError:
            raise DeliveryError(f"delivery timed out after {limit:g}s") from None

    def _batch(self, manifest: Manifest) -> Batch:
        return Batch(
            id=manifest.id,
            firehose=self.name,
            account=self.firehose.config.account,
            name=manifest.name,
            path=self.firehose.queue.batch_path(manifest),
            size=manifest.size,
            records=manifest.records,
            content_type=manifest.content_type,
            content_encoding=manifest.content_encoding,
            keys=tuple((k[0], k[1]) for k in manifest.keys),
            data=manifest.data,
        )

    async def _delivered(self, manifest: Manifest) -> None:
        crash_point("batch.after_put")
        queue = self.firehose.queue
        # Removing the files (a rename and a directory sync) overlaps the next cut and put
        # instead of delaying them (one removal in flight; a crash before it ends re-sends
        # the batch, as a crash just after the put always could). A batch held in a
        # segment has no files: a mark says it went, with the next group commit.
        if manifest.start is not None:
            queue.mark_done(manifest)
            if not self.channel.stream:  # `_put` wrote its bytes out for this channel
                queue.batch_path(manifest).unlink(missing_ok=True)
        else:
            await self._settle_removal()
            self._removal = asyncio.create_task(asyncio.to_thread(queue.remove_batch, manifest))
        queue.drop_batch(manifest)
        if manifest.start is not None and queue.consumed_segments():
            await self._settle_removal()
            self._removal = asyncio.create_task(self._free_segments())
        labels = (self.name, self.channel.name)
        metrics.batches_delivered.labels(*labels).inc()
        metrics.records_delivered.labels(*labels).inc(manifest.records)
        metrics.bytes_delivered.labels(*labels).inc(manifest.size)
        self.last_delivery = Outcome(time.time(), manifest.name)
        log.info(
            "batch.delivered",
            firehose=self.name,
            channel=self.channel.name,
            batch=manifest.name,
            records=manifest.records,
            bytes=manifest.size,
        )
        if self._failing_since is not None:
            if self._alerted:
                self.alerts.recovered(
                    self.firehose.config.error_alert_email,
                    self._incident(self.last_error.what if self.last_error else ""),
                )
            self._failing_since, self._alerted = None, False

    async def _free_segments(self) -> None:
        """Delete the segments whose records are all delivered (no cut does it for a
        stream whose group commits cut its batches)."""
        queue = self.firehose.queue
        queue.disk_bytes -= await asyncio.to_thread(queue.delete_consumed_segments)

    async def _settle_removal(self) -> None:
        """Wait for the files of the last delivered batch to be gone."""
        removal, self._removal = self._removal, None
        if removal is None:
            return
        try:
            await removal
        except OSError as exc:  # the batch was delivered: at worst it is sent again
            log.error("batch.remove_failed", firehose=self.name, error=str(exc))

    async def _failed(self, manifest: Manifest, exc: DeliveryError) -> bool:
        """Record a failed attempt; True when the batch left the queue (dead-lettered)."""
        now = time.time()
        self._failing_since = self._failing_since or now
        self.last_error = Outcome(now, str(exc))
        metrics.delivery_errors.labels(self.name, self.channel.name).inc()
        log.warning(
            "batch.failed",
            firehose=self.name,
            channel=self.channel.name,
            batch=manifest.name,
            error=str(exc),
            retryable=exc.retryable,
        )
        config = self.firehose.config
        if not exc.retryable or now - manifest.cut >= config.retry_for:
            await self._dead_letter(manifest, str(exc))
            return True
        if now - self._failing_since >= config.alert_after:
            self.alerts.failing(config.error_alert_email, self._incident(str(exc)))
            self._alerted = True
        return False

    async def _dead_letter(self, manifest: Manifest, error: str) -> None:
        queue = self.firehose.queue
        async with self._numbering:
            await self._round_settled()
            await asyncio.to_thread(queue.move_batch, manifest, self.dead_dir / self.name)
        if manifest.start is not None:
            queue.mark_done(manifest)
        queue.drop_batch(manifest)
        metrics.batches_dead_lettered.labels(self.name).inc()
        log.error(
            "batch.dead_lettered",
            firehose=self.name,
            channel=self.channel.name,
            batch=manifest.name,
            records=manifest.records,
            error=error,
        )
        self.alerts.dead_lettered(
            self.firehose.config.error_alert_email, self._incident(error), manifest.name
        )
        if self.dead_channel is not None:
            await self._copy_dead(manifest)

    async def _copy_dead(self, manifest: Manifest) -> None:
        """Also put a dead batch on the `dead_letter` channel; the local copy stays for replay."""
        assert self.dead_channel is not None
        batch = self._batch(manifest)
        path = self.dead_dir / self.name / f"{manifest.no}.data"
        copy = dataclasses.replace(batch, path=path, name=f"dead/{self.name}/{manifest.name}")
        try:
            async with asyncio.timeout(self.firehose.config.delivery_timeout):
                await self.dead_channel.put(copy)
        except (DeliveryError, TimeoutError) as exc:
            log.error(
                "batch.dead_letter_copy_failed",
                firehose=self.name,
                channel=self.dead_channel.name,
                batch=manifest.name,
                error=str(exc) or "timeout",
            )
            return
        log.info(
            "batch.dead_letter_copied",
            firehose=self.name,
            channel=self.dead_channel.name,
            batch=copy.name,
        )

    async def replay(self) -> AsyncIterator[Manifest]:
        """Put this firehose's dead-lettered batches back into delivery, oldest first."""
        queue = self.firehose.queue
        for source in dead_manifests(self.dead_dir / self.name):
            async with self._numbering:
                await self._round_settled()
                manifest = await asyncio.to_thread(queue.adopt, source)
            queue.add_adopted(manifest)
            log.info(
                "batch.replayed", firehose=self.name, batch=manifest.name, records=manifest.records
            )
            self.gone = None
            self.nudge()
            yield manifest

    def _gone(self, exc: DestinationGone) -> None:
        self.gone = str(exc)
        self.last_error = Outcome(time.time(), str(exc))
        log.error(
            "firehose.destination_gone",
            firehose=self.name,
            channel=self.channel.name,
            error=str(exc),
        )
        self.alerts.failing(self.firehose.config.error_alert_email, self._incident(str(exc)))

    def _incident(self, error: str) -> Incident:
        queue = self.firehose.queue
        now = time.time()
        return Incident(
            firehose=self.name,
            channel=self.channel.name,
            error=error,
            backlog_records=queue.queued_records(),
            backlog_bytes=queue.queued_bytes(),
            oldest_age=queue.oldest_age(now),
            first_failure=self._failing_since or now,
        )

    # -- drain and status -------------------------------------------------------------

    def drain(self) -> None:
        """Ask the loop to cut everything staged, deliver what it can, then end."""
        self.draining = True
        self.nudge()

    def status(self) -> dict[str, Any]:
        """This firehose's figures for `/v1/status`."""
        queue, config = self.firehose.queue, self.firehose.config
        return {
            "account": config.account,
            "channel": self.channel.name,
            "paused": config.paused,
            "stopped": self.gone,
            "queued_records": queue.queued_records(),
            "queued_bytes": queue.queued_bytes(),
            "oldest_queued_age_seconds": round(queue.oldest_age(time.time()), 3),
            "batches_pending": len(queue.batches),
            "last_delivery": _outcome(self.last_delivery, "batch"),
            "last_error": _outcome(self.last_error, "error"),
        }


def dead_manifests(directory: Path) -> list[Path]:
    """A dead-letter directory's batch manifests, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(directory.glob("*.json"), key=lambda p: int(p.stem))


def _outcome(outcome: Outcome | None, key: str) -> dict[str, Any] | None:
    if outcome is None:
        return None
    return {"time": datetime.fromtimestamp(outcome.at, UTC).isoformat(), key: outcome.what}
