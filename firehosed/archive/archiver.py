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
import shutil
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
from firehosed.config import FieldsConfig, FirehoseConfig, local_time
from firehosed.fileio import make_dirs, write_durably
from firehosed.mapping import Mapping
from firehosed.queue.base import Manifest
from firehosed.queue.frames import frame, scan
from firehosed.record import Record, decoder, encode

log = structlog.get_logger(__name__)

# Seconds after midnight before a day is built: a request received before midnight may
# still be committing (its body read, its group commit) when the day ends.
GRACE = 10.0
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
        self.configure(config, fields, mapping)
        self.spill = Spill(root, self.days, sync)
        self._state_path = root / "state.json"
        self.state = (
            msgspec.json.decode(self._state_path.read_bytes(), type=State)
            if self._state_path.exists()
            else State()
        )
        self.open_records = 0  # records spilled for days not yet offered (status)
        self._built: dict[date, Built] = {}

    def configure(
        self, config: FirehoseConfig, fields: FieldsConfig, mapping: Mapping | None
    ) -> None:
        """Apply the firehose's (re)loaded config."""
        self.config, self.fields, self.mapping = config, fields, mapping
        self.days = Days(config.timezone)
        if hasattr(self, "spill"):
            self.spill.days = self.days

    # -- while the day runs -----------------------------------------------------------

    async def spill_batch(self, batch: Manifest, path: Path) -> None:
        """Spill a queue batch (its file at `path`) into its days (durably)."""
        records = await asyncio.to_thread(_read_frames, path)
        await asyncio.to_thread(self.spill.add, batch.no, records)
        self.open_records += len(records)

    # -- when a day has ended ---------------------------------------------------------

    def due(self, now: float) -> list[date]:
        """Spilled days ended at least GRACE ago, oldest first."""
        return [d for d in self.spill.spilled_days() if self.days.end(d) + GRACE <= now]

    def next_due(self, now: float) -> float:
        """When the day now running becomes due (its end plus GRACE)."""
        return self.days.end(self.days.of(now)) + GRACE

    async def offer(self, day: date) -> Manifest | None:
        """`day`'s archive, built if it is not yet, as a batch to deliver; None when the
        day has no record."""
        name = archive_name(self.config.archive_name, self.config.account, day)
        built = await asyncio.to_thread(
            build,
            self.spill,
            day,
            self.root / "built",
            name,
            event_names=self.config.event_names,
            fields=self.fields,
            mapping=self.mapping,
            sync=self.sync,
        )
        if built is None:
            await asyncio.to_thread(self.spill.drop, day)
            return None
        self._built[day] = built
        return Manifest(
            no=-1,
            id=f"{self.name}:{day.isoformat()}:{built.sha256[:16]}",
            name=self.config.prefix + built.name,
            records=built.records,
            size=built.size,
            opened=self.days.start(day),
            cut=self.days.end(day),
            end=(0, 0),
            content_type=CONTENT_TYPE,
        )

    async def local_file(self, batch: Manifest, *, write: bool) -> Path:
        return self._built[self._day(batch)].path

    async def done(self, batch: Manifest) -> None:
        """The archive was delivered: remember it, then forget its spills and zip."""
        day = self._day(batch)
        built = self._built.pop(day)
        self.state.delivered_day, self.state.delivered_at = day, time.time()
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
            "open_records": self.open_records,
            "last_day_delivered": delivered.isoformat() if delivered else None,
            "delivered_at": (
                datetime.fromtimestamp(self.state.delivered_at).astimezone().isoformat()
                if self.state.delivered_at
                else None
            ),
        }

    def name_of(self, day: date) -> str:
        """The archive's name in the channel for `day`."""
        return self.config.prefix + archive_name(self.config.archive_name, self.config.account, day)

    def _day(self, batch: Manifest) -> date:
        return self.days.of(batch.opened)

    def _save(self) -> None:
        make_dirs(self.root, self.sync)
        write_durably(self._state_path, msgspec.json.encode(self.state), self.sync)

    def _forget(self, day: date, built: Built) -> None:
        self.spill.drop(day)
        built.path.unlink(missing_ok=True)

    def _move_dead(self, built: Built, target: Path) -> None:
        make_dirs(target.parent, self.sync)
        shutil.move(built.path, target)


def _read_frames(path: Path) -> list[Record]:
    """The records of one archive queue batch (bounded by the firehose's cut size)."""
    data = path.read_bytes()
    return [decoder.decode(span.payload) for span in scan(data) if span.payload is not None]
