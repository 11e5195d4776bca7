"""The daily archive: a day of signals built into its zip, against a ceiling.

    .venv/bin/python -m bench.archive [--records 1000000]

Spills a day of cart signals (the issue's 830 B shape, with 1 to 3 products: 790 B on
average) under six types, as an archive firehose's worker would; builds the day's zip in
a fresh process; delivers it to a local directory and over SFTP (OpenSSH, when
installed) with firehosed's own channels. Reports the spill's CPU per signal, the build
and delivery times, the build's peak RSS above that process's RSS before it began, and
the ceiling: Python's `zipfile` deflating the same CSV bytes from memory (the build's
CSVs, read back), timed in the same run. Targets (issue 15): build at >= 0.7x the
ceiling's speed, peak RSS <= 64 MiB above idle.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import logging
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import UTC, date, datetime
from datetime import time as dt_time
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import structlog

from bench import fixtures
from bench.servers import Missing, Sshd
from firehosed.archive.build import archive_name, build
from firehosed.archive.days import Days
from firehosed.archive.spill import Spill
from firehosed.channels.base import Batch, Channel
from firehosed.channels.directory import DirectoryChannel, DirectoryConfig
from firehosed.channels.sftp import SftpChannel, SftpConfig
from firehosed.fields import FieldsConfig
from firehosed.formats import zipcsv
from firehosed.record import Record
from firehosed.units import dec_hook

ZONE = "Asia/Kolkata"
DAY = date(2026, 12, 4)
TYPES = ("c", "b", "t", "v", "s", "p")  # six event types, cart-shaped payloads
SPILL_BATCH = 20_000  # records per queue batch spilled (about 16 MiB)
RSS_TARGET = 64 << 20
COLOURS = ("graphite black", "arctic white", "racing red", "navy blue", "forest green")
RATIO_TARGET = 0.7


def signal(n: int, kind: str, at: float, pick: random.Random) -> bytes:
    """Signal `n`: the benchmark's cart shape (about 830 B) with varied values (1 to 3
    products from a catalogue of 500, prices, quantities, times), so the CSV deflates as
    real days do, not as one record repeated."""
    body = fixtures.cart_abandon(anonymous=n % 10 == 0, kind=kind)
    body["signal_id"] = {"$oid": f"{n:024x}"}
    body["_id"] = {"$oid": f"{pick.getrandbits(96):024x}"}
    body["did"] = f"sess-{n // 5:08x}"
    if "pid" in body:
        body["pid"] = f"person-{n // 50:08x}"
    products = []
    for _ in range(pick.randint(1, 3)):
        sku = pick.randrange(500)
        price = round(pick.uniform(1, 400), 2)
        product = fixtures._product(
            f"sku-{sku:04d}",
            f"Catalogue product {sku:04d}, colour {COLOURS[sku % 5]}",
            price,
            f"cat{sku % 17}",
        )
        product["qty"] = pick.randint(1, 4)
        products.append(product)
    cart = body["cart"]
    assert isinstance(cart, dict)
    cart["p"] = products
    cart["qty"] = sum(p["qty"] for p in products)
    cart["cv"] = round(sum(p["uv"] * p["qty"] for p in products), 2)
    cart["cp"] = f"£{cart['cv']:.2f}"
    stamp = {"$date": datetime.fromtimestamp(at, UTC).isoformat()[:23] + "Z"}
    body["dt"] = body["evdt"] = stamp
    return msgspec.json.encode(body)


def spill_day(root: Path, records: int) -> tuple[int, float]:
    """`records` signals received across DAY, spilled in queue-batch-sized pieces; the
    bytes of their JSON and the CPU seconds spent spilling (made CSV and written)."""
    start = datetime.combine(DAY, dt_time(), ZoneInfo(ZONE)).timestamp()
    step = 86_000 / records
    spill = Spill(root, Days(ZONE), sync=False)
    rows = zipcsv.Columns(FieldsConfig(), None).part
    pick = random.Random(15)
    batch: list[Record] = []
    size, cpu = 0, 0.0
    for n in range(records):
        kind = TYPES[n % len(TYPES)]
        at = start + n * step
        raw = signal(n, kind, at, pick)
        size += len(raw)
        batch.append(Record(kind, f"{n:024x}", f"sess-{n // 5:08x}", None, at, at, raw))
        if len(batch) == SPILL_BATCH or n == records - 1:
            started = time.process_time()
            spill.add(n // SPILL_BATCH, batch, rows)
            cpu += time.process_time() - started
            batch = []
    return size, cpu


def build_child(root: Path, out: Path) -> dict[str, float]:
    """In this (fresh) process: build the day; seconds and peak RSS growth in bytes."""
    before = _status("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    built = build(
        Spill(root, Days(ZONE), sync=False),
        DAY,
        out,
        archive_name("{account}_%d%m%Y", "acme", DAY),
        event_names={},
        sync=True,
    )
    seconds = time.perf_counter() - started
    assert built is not None
    peak = _status("VmHWM")
    return {"seconds": seconds, "rss_growth": peak - before, "size": built.size}


def _status(field: str) -> int:
    """A figure of /proc/self/status in bytes. (Not getrusage's ru_maxrss: a child
    started by fork and exec reports its parent's peak there, the spill's.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(field)


def _reset_peak() -> None:
    """Start VmHWM again from the RSS now (proc(5), clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


async def deliver(zip_path: Path, size: int, channels: dict[str, Channel]) -> dict[str, float]:
    """Seconds to deliver the built zip through each of firehosed's own channels."""
    batch = Batch(
        id="archive",
        firehose="daily",
        account="acme",
        name=zip_path.name,
        path=zip_path,
        size=size,
        records=0,
        content_type="application/zip",
        content_encoding=None,
    )
    seconds = {}
    for name, channel in channels.items():
        try:
            started = time.perf_counter()
            await channel.put(batch)
            seconds[name] = time.perf_counter() - started
        finally:
            await channel.close()
    return seconds


def channels(work: Path, sshd: Sshd | None) -> dict[str, Channel]:
    """The local directory channel, and SFTP to OpenSSH when it runs here."""
    found: dict[str, Channel] = {
        "directory": DirectoryChannel(
            "local", DirectoryConfig(path=str(work / "delivered"), fsync=True)
        )
    }
    if sshd is not None:
        config = msgspec.convert(
            {
                "type": "sftp",
                "host": "127.0.0.1",
                "port": sshd.port,
                "username": sshd.username,
                "private_key": sshd.key_file.read_text(),
                "known_hosts": sshd.known_hosts_file.read_text(),
                "path": str(work / "sftp"),
            },
            SftpConfig,
            dec_hook=dec_hook,
        )
        found["sftp"] = SftpChannel("sftp", config)
    return found


def ceiling(zip_path: Path) -> tuple[float, int]:
    """Seconds for zipfile to deflate the build's CSV bytes from memory; those bytes."""
    with zipfile.ZipFile(zip_path) as archive:
        csvs = [(name, archive.read(name)) for name in archive.namelist()]
    started = time.perf_counter()
    with zipfile.ZipFile(io.BytesIO(), "w", zipfile.ZIP_DEFLATED, allowZip64=True) as out:
        for name, data in csvs:
            out.writestr(name, data)
    return time.perf_counter() - started, sum(len(d) for _, d in csvs)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.child:
        print(json.dumps(build_child(Path(args.child[0]), Path(args.child[1]))))
        return 0
    with tempfile.TemporaryDirectory(prefix="firehosed-archive-") as work:
        root, out = Path(work) / "archive", Path(work) / "built"
        size, spilled = spill_day(root, args.records)
        child = subprocess.run(
            [sys.executable, "-m", "bench.archive", "--child", str(root), str(out)],
            capture_output=True,
            text=True,
            check=True,
        )
        figures = json.loads(child.stdout)
        (zip_path,) = out.glob("*.zip")
        ceiling_seconds, csv_bytes = ceiling(zip_path)
        try:
            sshd: Sshd | None = Sshd.start(Path(work) / "sshd")
        except Missing as exc:
            print(f"SFTP: not measured ({exc})")
            sshd = None
        try:
            delivered = asyncio.run(
                deliver(zip_path, zip_path.stat().st_size, channels(Path(work), sshd))
            )
        finally:
            if sshd is not None:
                sshd.stop()
        digest = _sha256(zip_path)
        for where in delivered:
            (copy,) = (Path(work) / ("delivered" if where == "directory" else "sftp")).glob("*")
            assert _sha256(copy) == digest, f"{where}: the delivered zip differs"
    ratio = ceiling_seconds / figures["seconds"]
    growth = figures["rss_growth"]
    print(f"records: {args.records:,} ({args.records / len(TYPES):,.0f} per type, 6 types)")
    print(
        f"signals: {size / args.records:,.0f} B of JSON each; made into CSV rows and spilled "
        f"while the day runs: {spilled:.1f} s of CPU ({spilled / args.records * 1e6:.1f} us "
        "per signal)"
    )
    print(
        f"build: {figures['seconds']:.1f} s, {csv_bytes / 1e6:,.0f} MB of CSV into a "
        f"{figures['size'] / 1e6:,.0f} MB zip"
    )
    print(f"ceiling (zipfile deflating the same CSV bytes from memory): {ceiling_seconds:.1f} s")
    verdict = "pass" if ratio >= RATIO_TARGET else "miss"
    print(f"ratio: {ratio:.2f} x the ceiling's speed (target >= {RATIO_TARGET}): {verdict}")
    for where, seconds in delivered.items():
        print(
            f"delivered to {where}: {seconds:.2f} s (same bytes); built and delivered in "
            f"{figures['seconds'] + seconds:.1f} s"
        )
    verdict = "pass" if growth <= RSS_TARGET else "miss"
    print(
        f"peak RSS above idle during the build: {growth / 2**20:.1f} MiB (target <= 64): {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
