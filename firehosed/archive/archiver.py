"""The archive side of a daily archive firehose's delivery worker.

The worker cuts the firehose's queue into ordinary batches (encoded as spill frames, see
`encode_spill`) and hands each to `spill` instead of a channel; once spilled, the batch
is done in the queue. When a day has ended (plus GRACE, for requests received before
midnight and committed after it), the worker asks `offer` for its archive: built from
the spills into a durable zip (build.py) and described by a `Manifest`, which the worker
delivers with its usual retries, backoff, alerts and dead letter, calling back `done`
or `dead_letter` here. Days are offered oldest first; a daemon that was down over
midnights offers each missed day on start.

State (`state.json`, written durably): the last day delivered and when, and the days
whose late alert went out. Files, under `storage.dir/archive/<firehose>/`: `spill/`
(spill.py), `built/` (a day's zip until it is delivered).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from pathlib import Path

import msgspec
import structlog

from firehosed import metrics
from firehosed.archive.build import Built, archive_name, build
from firehosed.archive.days import Days
from firehosed.archive.spill import Spill
from firehosed.config import FirehoseConfig, local_time
from firehosed.fields import FieldsConfig
from firehosed.fileio import fsync_dir, make_dirs, write_durably
from firehosed.formats import zipcsv
from firehosed.mapping import Mapping
from firehosed.queue.base import Manifest
from firehosed.queue.frames import frame, scan
from firehosed.record import Record, decoder, encode

log = structlog.get_logger(__name__)

# Seconds after midnight before a day is built: a request received before midnight may
# still be committing (its body read, its group commit) when the day ends.
GRACE = 10.0
KEEP_DAYS = 7  # a delivered archive is kept this many days (`firehosed archive --force`)
CONTENT_TYPE = "application/zip"


def encode_spill(records: Sequence[Record]) -> bytes:
    """A queue batch of an archive firehose: its records as frames, for `spill`."""
    return b"".join(frame(encode(record)) for record in records)


class State(msgspec.Struct, kw_only=True):
    """What an archive firehose remembers across restarts."""

    delivered_day: date | None = None
    delivered_at: float | None = None
    late_alerted: list[date] = msgspec.field(default_factory=list)


class Archiver:
    """Spills, builds and offers one archive firehose's days."""

    def __init__(
        self,
        name: str,
        config: FirehoseConfig,
        fields: FieldsConfig,
        mapping: Mapping | None,
        root: Path,
        *,
        sync: bool = True,
    ) -> None:
        self.name = name
        self.root = root
        self.sync = sync
        self.spill = Spill(root, Days(config.timezone), sync)
        self.configure(config, fields, mapping)
        self._state_path = root / "state.json"
        self.state = (
            msgspec.json.decode(self._state_path.read_bytes(), type=State)
            if self._state_path.exists()
            else State()
        )
        self._built: dict[date, Built] = {}

    def configure(
        self, config: FirehoseConfig, fields: FieldsConfig, mapping: Mapping | None
    ) -> None:
        """Apply the firehose's (re)loaded config."""
        self.config, self.fields = config, fields
        self._columns = zipcsv.Columns(fields, mapping)
        self.days = self.spill.days = Days(config.timezone)

    # -- while the day runs -----------------------------------------------------------

    async def spill_batch(self, batch: Manifest, path: Path) -> None:
        """Spill a queue batch (its file at `path`) into its days (durably)."""
        records = await asyncio.to_thread(_read_frames, path)
        await asyncio.to_thread(self.spill.add, batch.no, records, self._columns.part)

    # -- when a day has ended ---------------------------------------------------------

    def due(self, now: float) -> list[date]:
        """Spilled days ended at least GRACE ago, oldest first."""
        return [d for d in self.spill.spilled_days() if self.days.end(d) + GRACE <= now]

    def next_due(self, now: float) -> float:
        """When the day now running becomes due (its end plus GRACE)."""
        return self.days.end(self.days.of(now)) + GRACE

    async def offer(self, day: date, cut: float | None = None) -> Manifest | None:
        """`day`'s archive, built if it is not yet, as a batch to deliver; None when the
        day has no record. Its `retry_for` runs from `cut` (default: the day's end)."""
        name = archive_name(self.config.archive_name, self.config.account, day)
        built = await asyncio.to_thread(
            build,
            self.spill,
            day,
            self.root / "built",
            name,
            event_names=self.config.event_names,
            sync=self.sync,
        )
        if built is None:
            await asyncio.to_thread(self.spill.drop, day)
            return None
        return self._offered(built, cut=self.days.end(day) if cut is None else cut)

    def _offered(self, built: Built, *, cut: float) -> Manifest:
        self._built[built.day] = built
        return Manifest(
            no=-1,
            id=f"{self.name}:{built.day.isoformat()}",
            name=self.config.prefix + built.name,
            records=built.records,
            size=built.size,
            opened=self.days.start(built.day),
            cut=cut,
            end=(0, 0),
            content_type=CONTENT_TYPE,
        )

    async def local_file(self, batch: Manifest, *, write: bool) -> Path:
        return self._built[self._day(batch)].path

    async def done(self, batch: Manifest) -> None:
        """The archive was delivered: remember it, then forget its spills and zip."""
        day = self._day(batch)
        built = self._built.pop(day)
        last = self.state.delivered_day
        self.state.delivered_day = day if last is None else max(last, day)
        self.state.delivered_at = time.time()
        self.state.late_alerted = [d for d in self.state.late_alerted if d > day]
        await asyncio.to_thread(self._save)
        metrics.archive_late.labels(self.name).set(1 if self.state.late_alerted else 0)
        await asyncio.to_thread(self._forget, day, built)

    async def dead_letter(self, batch: Manifest) -> Path:
        """The archive could not be delivered within retry_for: its zip is kept in
        `dead/` (sent again by hand: `firehosed archive --day`), its spills dropped."""
        day = self._day(batch)
        built = self._built.pop(day)
        target = self.root / "dead" / built.name
        await asyncio.to_thread(self._move_dead, built, target)
        await asyncio.to_thread(self.spill.drop, day)
        return target

    def late(self, now: float) -> date | None:
        """An ended day not delivered by `deliver_by` on the next day, not yet alerted:
        noted as alerted (the caller sends the one alert), or None."""
        if self.config.deliver_by is None:
            return None
        by = local_time(self.config.deliver_by)
        assert by is not None  # checked at load
        delivered = self.state.delivered_day or date.min
        for day in self.spill.spilled_days():
            deadline = self.days.at(day + timedelta(days=1), by)
            # (days are delivered oldest first: one up to `delivered` is only being tidied)
            if deadline <= now and day > delivered and day not in self.state.late_alerted:
                self.state.late_alerted.append(day)
                self._save()
                metrics.archive_late.labels(self.name).set(1)
                return day
        return None

    def status(self, now: float) -> dict[str, object]:
        """Per archive firehose: the open day, its records so far, the last delivered."""
        delivered = self.state.delivered_day
        return {
            "open_day": self.days.of(now).isoformat(),
            # spilled so far (records of the last minute may still be queued)
            "open_records": self.spill.count(self.days.of(now)),
            "last_day_delivered": delivered.isoformat() if delivered else None,
            "delivered_at": (
                datetime.fromtimestamp(self.state.delivered_at).astimezone().isoformat()
                if self.state.delivered_at
                else None
            ),
            # ended days not delivered by `deliver_by` (alerted), oldest first
            "late_days": [day.isoformat() for day in sorted(self.state.late_alerted)],
        }

    async def by_hand(self, day: date, *, force: bool) -> Manifest:
        """`firehosed archive --day`: `day`'s archive to deliver now. A day still running
        is refused; a delivered one is sent again (its kept zip) only with `force`; a
        dead-lettered one is sent again. ValueError says why not."""
        now = time.time()
        if self.days.end(day) + GRACE > now:
            raise ValueError(f"{day} has not ended in {self.config.timezone}")
        name = archive_name(self.config.archive_name, self.config.account, day)
        for folder in ("dead", "delivered"):
            path = self.root / folder / name
            if not path.exists():
                continue
            if folder == "delivered" and not force:
                raise ValueError(f"{day} was delivered as {name}: --force sends it again")
            facts = _facts(path)
            built = Built(day, name, path, path.stat().st_size, facts.sha256, facts.records)
            return self._offered(built, cut=now)
        offer = await self.offer(day, cut=now)
        if offer is None:
            raise ValueError(f"{day} has no record (an empty day has no archive)")
        return offer

    def name_of(self, day: date) -> str:
        """The archive's name in the channel for `day`."""
        return self.config.prefix + archive_name(self.config.archive_name, self.config.account, day)

    def _day(self, batch: Manifest) -> date:
        return self.days.of(batch.opened)

    def _save(self) -> None:
        make_dirs(self.root, self.sync)
        write_durably(self._state_path, msgspec.json.encode(self.state), self.sync)

    def _forget(self, day: date, built: Built) -> None:
        """Drop the day's spills; keep its zip in `delivered/` for KEEP_DAYS."""
        kept = self.root / "delivered"
        make_dirs(kept, self.sync)
        if built.path.parent != kept:
            _keep(built, kept / built.path.name, self.sync)
        self.spill.drop(day)
        for old in kept.glob("*.zip"):
            if old.stat().st_mtime < time.time() - KEEP_DAYS * 86400:
                old.unlink()
                _facts_path(old).unlink(missing_ok=True)

    def _move_dead(self, built: Built, target: Path) -> None:
        make_dirs(target.parent, self.sync)
        _keep(built, target, self.sync)


class Facts(msgspec.Struct):
    """What a kept archive (delivered or dead) was, beside it as `<name>.json`."""

    records: int
    sha256: str


def _facts_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _facts(path: Path) -> Facts:
    facts = _facts_path(path)
    if not facts.exists():
        return Facts(records=0, sha256="")
    return msgspec.json.decode(facts.read_bytes(), type=Facts)


def _keep(built: Built, target: Path, sync: bool) -> None:
    """Move a built archive to `target`, its facts beside it."""
    write_durably(
        _facts_path(target), msgspec.json.encode(Facts(built.records, built.sha256)), sync
    )
    os.replace(built.path, target)
    if sync:
        fsync_dir(target.parent)


def _read_frames(path: Path) -> list[Record]:
    """The records of one archive queue batch (bounded by the firehose's cut size)."""
    data = path.read_bytes()
    return [decoder.decode(span.payload) for span in scan(data) if span.payload is not None]
