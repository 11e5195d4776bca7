"""The delivery worker of one firehose: take batches, put them, retry, dead-letter, alert.

One worker per firehose, one batch in flight at a time, oldest first:

    queue.next_batch() ─► channel.put(batch)
                            ├─ ok: queue.done(batch), count, maybe "recovered"
                            ├─ DeliveryError: back off (full jitter), alert after
                            │   alert_after, dead-letter after retry_for
                            └─ DestinationGone: stop delivering, alert

When a batch is cut, and how, is the queue's business (queue/base.py): the worker gives
it the firehose's encoder and cut rules, and takes what it hands out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from firehosed import formats, metrics
from firehosed.alerts import Alerts, Incident
from firehosed.archive.archiver import Archiver, encode_spill
from firehosed.channels.base import Batch, Channel
from firehosed.config import FirehoseConfig
from firehosed.errors import BatchGone, DeliveryError, DestinationGone
from firehosed.faults import crash_point
from firehosed.firehose import Firehose
from firehosed.mapping import Mapping
from firehosed.queue.base import CutRules, Encoded, Encoder, Manifest
from firehosed.record import Record
from firehosed.tap import Tap

log = structlog.get_logger(__name__)

BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
STREAM_MAX_BYTES = 8 << 20
STREAM_MAX_RECORDS = 500


def backoff(attempt: int, retry_after: float | None) -> float:
    """Full-jitter exponential backoff (base 1 s, cap 5 min), never below `retry_after`."""
    delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
    return max(delay, retry_after or 0.0)


# An archive firehose's queue is cut into spills this often, this big at most: the day's
# records leave the queue as they come, and a spill is small enough to read whole.
ARCHIVE_SPILL_INTERVAL = 60.0
ARCHIVE_SPILL_BYTES = 16 << 20
ARCHIVE_CHECK = 5.0  # seconds: how often an archive worker looks at the wall clock


def cut_rules(config: FirehoseConfig, channel: Channel) -> CutRules:
    """When a firehose's batches are cut for this channel: streams small, at once or
    after the channel's `max_wait`; files on the firehose's schedule, up to `max_file`;
    a daily archive's into spills (ARCHIVE_SPILL_*)."""
    if config.format == "zip-csv":
        return CutRules(
            stream=False,
            max_records=1 << 62,
            max_bytes=ARCHIVE_SPILL_BYTES,
            interval=ARCHIVE_SPILL_INTERVAL,
        )
    if channel.stream:
        limit = channel.max_records or STREAM_MAX_RECORDS
        wait = channel.max_wait or 0.0
        return CutRules(stream=True, max_records=limit, max_bytes=STREAM_MAX_BYTES, interval=wait)
    interval = config.minutes_between_files * 60.0
    return CutRules(stream=False, max_records=1 << 62, max_bytes=config.max_file, interval=interval)


def batch_encoder(config: FirehoseConfig, mapping: Mapping | None, channel: Channel) -> Encoder:
    """The firehose's format and naming, for the queue to encode batches with (in a thread)."""
    if config.format == "zip-csv":
        return _spill_encoder
    fmt = channel.format or config.format
    compression = "none" if channel.stream else formats.compression_for(fmt, config.compression)
    extension = formats.extension(fmt, compression)
    content_type = formats.CONTENT_TYPES[fmt]
    encoding = "gzip" if compression == "gzip" else None

    def encode(records: Sequence[Record]) -> Encoded:
        data = formats.encode_batch(fmt, records, mapping, compression)
        opened = datetime.fromtimestamp(records[0].received, UTC)
        base = opened.strftime(config.filename_pattern)
        return Encoded(data, base, config.prefix, extension, content_type, encoding)

    return encode


def _spill_encoder(records: Sequence[Record]) -> Encoded:
    """A daily archive's queue batch: its records as spill frames, never delivered as is."""
    opened = datetime.fromtimestamp(records[0].received, UTC).strftime("spill-%Y%m%d-%H%M%S")
    return Encoded(encode_spill(records), opened, "", ".spill", "application/octet-stream", None)


class Source(Protocol):
    """Where a batch being delivered comes from: the queue, or an archive's built days."""

    async def local_file(self, batch: Manifest, *, write: bool) -> Path: ...
    async def done(self, batch: Manifest) -> None: ...
    async def dead_letter(self, batch: Manifest) -> Path: ...


class Phase(enum.Enum):
    """Where a worker is in its life."""

    RUNNING = "running"  # delivering batches as they come
    DRAIN = "drain"  # asked to drain: cut everything, then deliver what it can and end
    DRAINING = "draining"  # everything cut: delivering what it can, then ending
    RETIRING = "retiring"  # left the config: delivering everything, then ending
    STOPPING = "stopping"  # ending after the current step


@dataclass(slots=True)
class Outcome:
    """When and what: the last delivery or the last error of a worker."""

    at: float
    what: str


@dataclass(slots=True)
class Failing:
    """A run of failed attempts: since when, and whether it was alerted."""

    since: float
    alerted: bool = False


class Worker:
    """Delivers one firehose's queue to its channel until stopped."""

    def __init__(
        self,
        firehose: Firehose,
        channel: Channel,
        dead_channel: Channel | None,
        alerts: Alerts,
        tap: Tap | None = None,
        *,
        archive: Archiver | None = None,
    ) -> None:
        self.firehose = firehose
        # A daily archive firehose: batches are spilled into their days, and each ended
        # day's archive is what gets delivered.
        self.archive = archive
        self._spilled_at = 0.0  # when the queue was last spilled whole (wall clock)
        # One archive delivery at a time: the loop's, or one asked for by hand.
        self._archiving = asyncio.Lock()
        self.tap = tap or Tap()  # what `firehosed tail` follows
        self.queue = firehose.queue
        self.alerts = alerts
        self.phase = Phase.RUNNING
        # Ends a backoff or an idle pause: stop, drain, reload or replay (new records
        # must not shorten a backoff; they reach the queue, not the worker).
        self._control = asyncio.Event()
        self.channel = channel
        # Where dead-lettered batches are also copied (`dead_letter` key), if anywhere.
        self.dead_channel: Channel | None = None
        # Set when the destination said it is gone for good: delivery stops until a
        # reload or a replay.
        self.gone: str | None = None
        self.failing: Failing | None = None
        self.last_delivery: Outcome | None = None
        self.last_error: Outcome | None = None
        self.configure(channel, dead_channel)

    @property
    def name(self) -> str:
        return self.firehose.name

    def configure(self, channel: Channel, dead_channel: Channel | None) -> None:
        """Apply the firehose's (re)loaded config and channels."""
        config = self.firehose.config
        self.channel, self.dead_channel = channel, dead_channel
        self.queue.configure(
            cut_rules(config, channel), batch_encoder(config, self.firehose.mapping, channel)
        )
        if self.archive is not None:
            self.archive.configure(config, self.archive.fields, self.firehose.mapping)
        if self.phase is Phase.RETIRING:  # back in the config
            self.phase = Phase.RUNNING
        self.gone = None  # a reload resumes a firehose stopped by 410
        self.nudge()

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until `stop()`, or until a drain or retirement is finished.

        This loop is the only place that delivers, so one batch is never in flight twice.
        """
        watch = asyncio.create_task(self._watch_late(self.archive)) if self.archive else None
        try:
            await self._loop()
        finally:
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            await self.queue.stop()

    async def _loop(self) -> None:
        while self.phase is not Phase.STOPPING:
            if self.phase is Phase.DRAIN:
                await self.queue.seal()  # open batches get their files before anything
                self.phase = Phase.DRAINING
            if not self._may_deliver():
                if self.phase is Phase.DRAINING:
                    return
                await self.queue.keep()  # until nudged: resumed, reloaded, stopped
                continue
            finishing = self.phase in (Phase.DRAINING, Phase.RETIRING)
            if self.archive is not None:
                if await self._archive_turn(self.archive, finishing) and finishing:
                    return
                continue
            batch = await self.queue.next_batch(flush=finishing)
            if batch is not None:
                await self._deliver(batch)
            elif finishing and self._finished():
                return

    def _finished(self) -> bool:
        """Draining: no batch left. Retiring: no record left."""
        figures = self.queue.figures(time.time())
        if self.phase is Phase.DRAINING:
            return figures.batches == 0
        return figures.records == 0

    def _may_deliver(self) -> bool:
        return not self.firehose.config.paused and self.gone is None

    async def _pause(self, seconds: float | None = None) -> None:
        """Wait for `nudge()` (or `seconds`): a backoff, or a paused or stopped firehose."""
        self._control.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._control.wait(), seconds)

    def nudge(self) -> None:
        """Wake the loop, even from a backoff: its settings or its task changed."""
        self._control.set()
        self.queue.interrupt()

    def stop(self) -> None:
        """Ask the loop to end after the current step."""
        self.phase = Phase.STOPPING
        self.nudge()

    def drain(self) -> None:
        """Ask the loop to cut everything staged, deliver what it can, then end."""
        if self.phase is not Phase.STOPPING:
            self.phase = Phase.DRAIN
            self.nudge()

    def retire(self) -> None:
        """The firehose left the config: deliver its backlog, then end."""
        if self.phase is Phase.RUNNING:
            self.phase = Phase.RETIRING
            self.nudge()

    @property
    def retired(self) -> bool:
        """Whether the loop ended because the firehose left the config."""
        return self.phase is Phase.RETIRING

    # -- a daily archive ----------------------------------------------------------------

    async def _archive_turn(self, archive: Archiver, finishing: bool) -> bool:
        """One step of an archive firehose: deliver the days that ended, else spill the
        next batch (waiting for it at most until the running day ends). True when the
        queue had nothing left to spill."""
        now = time.time()
        if now >= archive.next_due(self._spilled_at):
            # A day ended since everything was last spilled (or the worker just started):
            # what was committed before its end goes into the spills before it is built.
            while (batch := await self.queue.next_batch(flush=True)) is not None:
                await self._spill(archive, batch)
            self._spilled_at = now
        if due := archive.due(now):
            for day in due:
                async with self._archiving:
                    offer = await archive.offer(day)
                    if offer is not None:
                        await self._deliver(offer, archive)
                if self.phase is Phase.STOPPING or not self._may_deliver():
                    break
            return False
        loop = asyncio.get_running_loop()
        # Timers run on the monotonic clock, days on the wall clock: look again at least
        # every ARCHIVE_CHECK seconds, so a wall clock that jumps (NTP) is followed.
        until = min(ARCHIVE_CHECK, max(0.0, archive.next_due(now) - now))
        wake = loop.call_later(until, self.queue.interrupt)
        try:
            batch = await self.queue.next_batch(flush=finishing)
        finally:
            wake.cancel()
        if batch is None:
            return True
        await self._spill(archive, batch)
        return False

    async def archive_day(self, day: date, *, force: bool) -> AsyncIterator[dict[str, Any]]:
        """`firehosed archive --day`: build (if need be) and deliver `day`'s archive now,
        reporting each step; a step that cannot be taken reports its error and ends."""
        archive = self.archive
        if archive is None:
            yield {"error": f"firehose {self.name} is not a daily archive (format zip-csv)"}
            return
        yield {"step": "waiting", "day": day.isoformat()}
        async with self._archiving:
            yield {"step": "building", "day": day.isoformat()}
            try:
                offer = await archive.by_hand(day, force=force)
            except ValueError as exc:
                yield {"error": str(exc)}
                return
            yield {
                "step": "delivering",
                "name": offer.name,
                "records": offer.records,
                "bytes": offer.size,
            }
            await self._deliver(offer, archive)
        if self.last_delivery is not None and self.last_delivery.what == offer.name:
            yield {"step": "delivered", "name": offer.name}
        else:
            yield {"error": self.last_error.what if self.last_error else "not delivered"}

    async def _watch_late(self, archive: Archiver) -> None:
        """Alongside the loop (which may be retrying a put for hours): every ARCHIVE_CHECK
        seconds, alert once for each day not delivered by its `deliver_by`."""
        while True:
            while (late := archive.late(time.time())) is not None:
                error = self.last_error.what if self.last_error else "not delivered yet"
                log.error("archive.late", firehose=self.name, day=late.isoformat())
                self.alerts.archive_late(
                    self.firehose.config.error_alert_email,
                    self._incident(error, self.failing),
                    archive.name_of(late),
                )
            await asyncio.sleep(ARCHIVE_CHECK)

    async def _spill(self, archive: Archiver, batch: Manifest) -> None:
        path = await self.queue.local_file(batch, write=True)
        await archive.spill_batch(batch, path)
        await self.queue.done(batch)

    # -- delivering -------------------------------------------------------------------

    async def _deliver(self, manifest: Manifest, source: Source | None = None) -> None:
        """Put one batch (of the queue, unless `source` says where it comes from),
        retrying with backoff until delivered, dead-lettered or stopped."""
        source = source or self.queue
        attempt = 0
        while self.phase is not Phase.STOPPING and self._may_deliver():
            try:
                await self._put(manifest, source)
            except DestinationGone as exc:
                self._gone(exc)
                return
            except BatchGone as exc:
                log.warning("batch.gone", firehose=self.name, batch=manifest.name, reason=str(exc))
                return
            except Exception as exc:
                if not isinstance(exc, DeliveryError):  # a channel bug must not kill the worker
                    log.exception(
                        "channel.unexpected_error", firehose=self.name, channel=self.channel.name
                    )
                    exc = DeliveryError(f"unexpected {exc.__class__.__name__}: {exc}")
                if await self._failed(manifest, exc, source):
                    return
                await self._pause(backoff(attempt, exc.retry_after))
                attempt += 1
                continue
            await self._delivered(manifest, source)
            return

    async def _put(self, manifest: Manifest, source: Source) -> None:
        """One attempt, bounded by `delivery_timeout` (a stalled server must not hang us)."""
        limit = self.firehose.config.delivery_timeout
        # A stream batch, and a reload gave the firehose a channel that reads files:
        # the queue writes its bytes out once, not on every retry.
        path = await source.local_file(manifest, write=not self.channel.stream)
        try:
            async with asyncio.timeout(limit):
                await self.channel.put(self._batch(manifest, path))
        except TimeoutError:
            raise DeliveryError(f"delivery timed out after {limit:g}s") from None

    def _batch(self, manifest: Manifest, path: Path) -> Batch:
        return Batch(
            id=manifest.id,
            firehose=self.name,
            account=self.firehose.config.account,
            name=manifest.name,
            path=path,
            size=manifest.size,
            records=manifest.records,
            content_type=manifest.content_type,
            content_encoding=manifest.content_encoding,
            keys=tuple((k[0], k[1]) for k in manifest.keys),
            data=manifest.data,
        )

    async def _delivered(self, manifest: Manifest, source: Source) -> None:
        crash_point("batch.after_put")
        await source.done(manifest)
        labels = (self.name, self.channel.name)
        metrics.batches_delivered.labels(*labels).inc()
        metrics.records_delivered.labels(*labels).inc(manifest.records)
        metrics.bytes_delivered.labels(*labels).inc(manifest.size)
        self.last_delivery = Outcome(time.time(), manifest.name)
        if self.tap.listening:
            self.tap.publish(
                {
                    "event": "delivered",
                    "time": self.last_delivery.at,
                    "firehose": self.name,
                    "firehoses": [self.name],
                    "batch": manifest.name,
                    "records": manifest.records,
                    "bytes": manifest.size,
                }
            )
        log.info(
            "batch.delivered",
            firehose=self.name,
            channel=self.channel.name,
            batch=manifest.name,
            records=manifest.records,
            bytes=manifest.size,
        )
        failing, self.failing = self.failing, None
        if failing is not None and failing.alerted:
            self.alerts.recovered(
                self.firehose.config.error_alert_email,
                self._incident(self.last_error.what if self.last_error else "", failing),
            )

    async def _failed(self, manifest: Manifest, exc: DeliveryError, source: Source) -> bool:
        """Record a failed attempt; True when the batch left the queue (dead-lettered)."""
        now = time.time()
        failing = self.failing = self.failing or Failing(since=now)
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
            await self._dead_letter(manifest, str(exc), source)
            return True
        if now - failing.since >= config.alert_after:
            self.alerts.failing(config.error_alert_email, self._incident(str(exc), failing))
            failing.alerted = True
        return False

    async def _dead_letter(self, manifest: Manifest, error: str, source: Source) -> None:
        path = await source.dead_letter(manifest)
        log.error(
            "batch.dead_lettered",
            firehose=self.name,
            channel=self.channel.name,
            batch=manifest.name,
            records=manifest.records,
            error=error,
        )
        incident = self._incident(error, self.failing)
        self.alerts.dead_lettered(self.firehose.config.error_alert_email, incident, manifest.name)
        if self.dead_channel is not None:
            await self._copy_dead(manifest, path)

    async def _copy_dead(self, manifest: Manifest, path: Path) -> None:
        """Also put a dead batch on the `dead_letter` channel; the local copy stays for replay."""
        assert self.dead_channel is not None
        batch = self._batch(manifest, path)
        copy = dataclasses.replace(batch, name=f"dead/{self.name}/{manifest.name}")
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
        async for manifest in self.queue.replay():
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
        self.alerts.failing(
            self.firehose.config.error_alert_email, self._incident(str(exc), self.failing)
        )

    def _incident(self, error: str, failing: Failing | None) -> Incident:
        now = time.time()
        figures = self.queue.figures(now)
        return Incident(
            firehose=self.name,
            channel=self.channel.name,
            error=error,
            backlog_records=figures.records,
            backlog_bytes=figures.bytes,
            oldest_age=figures.oldest_age,
            first_failure=failing.since if failing is not None else now,
        )

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """This firehose's figures for `/v1/status`."""
        figures = self.queue.figures(time.time())
        return {
            "account": self.firehose.config.account,
            "channel": self.channel.name,
            "paused": self.firehose.config.paused,
            "stopped": self.gone,
            "queued_records": figures.records,
            "queued_bytes": figures.bytes,
            "oldest_queued_age_seconds": round(figures.oldest_age, 3),
            "batches_pending": figures.batches,
            "dead_letter_bytes": figures.dead_bytes,
            "last_delivery": _outcome(self.last_delivery, "batch"),
            "last_error": _outcome(self.last_error, "error"),
            # Since when the batch in hand has been failing (being retried), if it is.
            "failing_since": _time(self.failing.since) if self.failing is not None else None,
            **({"archive": self.archive.status(time.time())} if self.archive else {}),
        }


def _outcome(outcome: Outcome | None, key: str) -> dict[str, Any] | None:
    if outcome is None:
        return None
    return {"time": _time(outcome.at), key: outcome.what}


def _time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()
