"""Building one day's archive from its spills: a zip file, durable before it is offered
for delivery, named and sized once.

A build writes `<name>.zip.building` and renames it to `<name>.zip` after an fsync (and
the directory's): a crash mid-build leaves no `.zip`, and the next start builds again,
from the same spills, the same bytes (formats/zipcsv.py). The delivered name and bytes
are therefore fixed before the first attempt, like any batch's.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from firehosed.archive.spill import Spill
from firehosed.fileio import fsync_dir, make_dirs
from firehosed.formats import zipcsv

HASH_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Built:
    """A day's archive on local disk, ready to deliver."""

    day: date
    name: str  # in the channel: `archive_name` of the day, ".zip" added
    path: Path
    size: int
    sha256: str
    records: int


def archive_name(pattern: str, account: str, day: date) -> str:
    """`archive_name` for `day`: strftime of the day (midnight) with {account}, + ".zip"."""
    midnight = datetime(day.year, day.month, day.day)
    return midnight.strftime(pattern.replace("{account}", account.replace("%", "%%"))) + ".zip"


def build(
    spill: Spill,
    day: date,
    out: Path,
    name: str,
    *,
    event_names: dict[str, str],
    sync: bool = True,
) -> Built | None:
    """Build `day`'s archive into `out` (a worker thread); None for a day with no record.

    An archive already built (a restart after the build, before delivery) is taken as it
    is: it is what the first attempt offered.
    """
    make_dirs(out, sync)
    path = out / name
    if not path.exists():
        kinds = spill.types(day)
        if not kinds:
            return None
        stamp = day.strftime("%d%m%Y")
        entries = [
            zipcsv.Entry(csv_name, spill.parts(day, kind))
            for kind, csv_name in zipcsv.entry_names(kinds, stamp, event_names)
        ]
        building = out / (name + ".building")
        with building.open("wb") as f:
            zipcsv.write(f, entries)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(building, path)
        if sync:
            fsync_dir(out)
    return Built(day, name, path, path.stat().st_size, _sha256(path), spill.count(day))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
