"""What one file batch cut costs per record, in-process: read back, encode, persist.

A queue in `work` is filled with committed cart-abandon records (synced in groups of 32,
as group commit does under load), then cut the way a file firehose's worker cuts it:
`FirehoseQueue.read`, NDJSON `formats.encode`, `FirehoseQueue.persist_batch`. Each
step's user and system CPU per record come from getrusage, so the kernel's share of
reading the segments back and writing and syncing the batch is counted.

Alone: `python -m bench.cutcost [RECORDS]` (in a temp dir under /tmp).
"""

from __future__ import annotations

import resource
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msgspec

from bench import fixtures
from firehosed import formats
from firehosed.queue.frames import frame
from firehosed.queue.store import FirehoseQueue
from firehosed.record import Record, encode

T = TypeVar("T")
GROUP = 32


def steps(work: Path, count: int) -> list[tuple[str, float, float]]:
    """(step, user µs, system µs) per record for one cut of `count` records."""
    queue = FirehoseQueue(work / "cutcost", "cutcost", 1 << 30, sync=True)
    queue.open()
    raw = msgspec.json.encode(fixtures.cart_abandon(anonymous=False))
    marker = fixtures.OID.encode()
    group: list[bytes] = []
    for i in range(count):
        record = Record("b", str(i), "s", "p", 0.0, 0.0, raw.replace(marker, b"%024x" % i))
        group.append(frame(encode(record)))
        if len(group) == GROUP or i == count - 1:
            queue.append(b"".join(group), len(group))
            queue.committed = queue.write(queue.take_pending(), sync=True)
            group = []
    costs: list[tuple[str, float, float]] = []

    def timed(step: str, work: Callable[[], T]) -> T:
        before = resource.getrusage(resource.RUSAGE_SELF)
        out = work()
        after = resource.getrusage(resource.RUSAGE_SELF)
        user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
        costs.append((step, 1e6 * user / count, 1e6 * system / count))
        return out

    records, end, _ = timed("read back", lambda: queue.read(1 << 62, 1 << 62))
    data = timed("encode NDJSON", lambda: formats.encode("ndjson", records, None, "none"))
    manifest = queue.new_manifest(
        name="cut.ndjson",
        records=len(records),
        size=len(data),
        opened=0.0,
        cut=0.0,
        end=end,
        content_type=formats.CONTENT_TYPES["ndjson"],
    )
    timed("persist (write, fsync)", lambda: queue.persist_batch(manifest, data))
    queue.close()
    return costs


def line(work: Path, count: int) -> str:
    """One sentence for the report."""
    costs = steps(work, count)
    total = sum(user + system for _, user, system in costs)
    parts = "; ".join(f"{step} {user + system:.1f}" for step, user, system in costs)
    return (
        f"One file batch cut, in-process ({count:,} records, `bench/cutcost.py`): "
        f"{total:.1f} µs of CPU per record ({parts})."
    )


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 75_000
    with tempfile.TemporaryDirectory(prefix="firehosed-cutcost-") as tmp:
        for step, user, system in steps(Path(tmp), count):
            print(f"{step}: {user:.2f} µs user + {system:.2f} µs system per record")
