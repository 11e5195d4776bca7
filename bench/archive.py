"""The daily archive: a day of signals built into its zip, against a ceiling.

    .venv/bin/python -m bench.archive [--records 1000000]

Spills a day of the benchmark's cart signals (about 830 B each) under six types, as an
archive firehose's worker would, then builds the day's zip in a fresh process and
reports the build time, the build's peak RSS above that process's RSS before it began,
and the ceiling: Python's `zipfile` deflating the same CSV bytes from memory (the
build's CSVs, read back), timed in the same run. Targets (issue 15): build at ≥ 0.7x
the ceiling's speed, peak RSS ≤ 64 MiB above idle.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import date, datetime
from datetime import time as dt_time
from pathlib import Path
from zoneinfo import ZoneInfo

from bench import fixtures
from firehosed.archive.build import archive_name, build
from firehosed.archive.days import Days
from firehosed.archive.spill import Spill
from firehosed.config import FieldsConfig
from firehosed.formats import zipcsv
from firehosed.record import Record

ZONE = "Asia/Kolkata"
DAY = date(2026, 12, 4)
TYPES = ("c", "b", "t", "v", "s", "p")  # six event types, cart-shaped payloads
SPILL_BATCH = 20_000  # records per queue batch spilled (about 16 MiB)
RSS_TARGET = 64 << 20
RATIO_TARGET = 0.7


def spill_day(root: Path, records: int) -> None:
    """`records` signals received across DAY, spilled in queue-batch-sized pieces."""
    template = fixtures.Template(fixtures.template_text(1, 0.0))
    start = datetime.combine(DAY, dt_time(), ZoneInfo(ZONE)).timestamp()
    step = 86_000 / records
    spill = Spill(root, Days(ZONE), sync=False)
    batch: list[Record] = []
    for n in range(records):
        raw, _ = template.render("a" * 16, n)
        raw = raw.strip()
        kind = TYPES[n % len(TYPES)]
        raw = raw.replace(b'"type":"b"', f'"type":"{kind}"'.encode(), 1)
        at = start + n * step
        batch.append(Record(kind, f"{n:024x}", f"s{n // 5}", None, at, at, raw))
        if len(batch) == SPILL_BATCH:
            spill.add(n // SPILL_BATCH, batch, zipcsv.payload_keys)
            batch = []
    if batch:
        spill.add(records // SPILL_BATCH + 1, batch, zipcsv.payload_keys)


def build_child(root: Path, out: Path) -> dict[str, float]:
    """In this (fresh) process: build the day; seconds and peak RSS growth in bytes."""
    before = _rss()
    started = time.perf_counter()
    built = build(
        Spill(root, Days(ZONE), sync=False),
        DAY,
        out,
        archive_name("{account}_%d%m%Y", "acme", DAY),
        event_names={},
        fields=FieldsConfig(),
        mapping=None,
        sync=True,
    )
    seconds = time.perf_counter() - started
    assert built is not None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "rss_growth": peak - before, "size": built.size}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def ceiling(zip_path: Path) -> tuple[float, int]:
    """Seconds for zipfile to deflate the build's CSV bytes from memory; those bytes."""
    with zipfile.ZipFile(zip_path) as archive:
        csvs = [(name, archive.read(name)) for name in archive.namelist()]
    started = time.perf_counter()
    with zipfile.ZipFile(io.BytesIO(), "w", zipfile.ZIP_DEFLATED, allowZip64=True) as out:
        for name, data in csvs:
            out.writestr(name, data)
    return time.perf_counter() - started, sum(len(d) for _, d in csvs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(build_child(Path(args.child[0]), Path(args.child[1]))))
        return 0
    with tempfile.TemporaryDirectory(prefix="firehosed-archive-") as work:
        root, out = Path(work) / "archive", Path(work) / "built"
        started = time.perf_counter()
        spill_day(root, args.records)
        spilled = time.perf_counter() - started
        child = subprocess.run(
            [sys.executable, "-m", "bench.archive", "--child", str(root), str(out)],
            capture_output=True,
            text=True,
            check=True,
        )
        figures = json.loads(child.stdout)
        (zip_path,) = out.glob("*.zip")
        ceiling_seconds, csv_bytes = ceiling(zip_path)
    ratio = ceiling_seconds / figures["seconds"]
    growth = figures["rss_growth"]
    print(f"records: {args.records:,} ({args.records / len(TYPES):,.0f} per type, 6 types)")
    print(f"spilled in {spilled:.1f} s")
    print(
        f"build: {figures['seconds']:.1f} s, {csv_bytes / 1e6:,.0f} MB of CSV into a "
        f"{figures['size'] / 1e6:,.0f} MB zip"
    )
    print(f"ceiling (zipfile deflating the same CSV bytes from memory): {ceiling_seconds:.1f} s")
    verdict = "pass" if ratio >= RATIO_TARGET else "miss"
    print(f"ratio: {ratio:.2f} x the ceiling's speed (target >= {RATIO_TARGET}): {verdict}")
    verdict = "pass" if growth <= RSS_TARGET else "miss"
    print(
        f"peak RSS above idle during the build: {growth / 2**20:.1f} MiB (target <= 64): {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
