"""What the daemon's work costs per record, in-process, step by step.

Records (cart-abandon, distinct ids) go through the daemon's own code, one at a time as
single-signal POSTs bring them: envelope decode and routing into a firehose queue
(`bench.inprocess.Ingest`), a group commit of every 32 (write and fdatasync, as under
load), then one file batch cut the way a file firehose's worker makes it:
`SegmentStore.read`, NDJSON `formats.encode`, `SegmentStore.persist_batch`. Each step's
CPU per record is this thread's CPU clock (user and kernel, to the nanosecond), so the
kernel's share (syncs, reading the segments back, writing the batch) is counted. No
HTTP, no event loop, one thread.

Alone: `python -m bench.perrecord [RECORDS]` (in a temp dir under /tmp).
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msgspec

from bench import fixtures
from bench.inprocess import Ingest
from firehosed import formats
from firehosed.queue.store import SegmentStore

T = TypeVar("T")
GROUP = 32  # requests per fsync round in the single-signal figure


class Steps:
    """CPU seconds (this thread, user and kernel) spent in each named step, summed."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def run(self, step: str, work: Callable[[], T]) -> T:
        before = time.thread_time()
        out = work()
        self.spent[step] = self.spent.get(step, 0.0) + time.thread_time() - before
        return out


def steps(work: Path, count: int) -> list[tuple[str, float]]:
    """(step, CPU µs per record), for `count` records."""
    queue = SegmentStore(work / "perrecord", "perrecord", 1 << 30, sync=True)
    queue.open()
    ingest = Ingest([("perrecord", queue, {"format": "ndjson"})])
    template = msgspec.json.encode(fixtures.cart_abandon(anonymous=False))
    raws = [template.replace(fixtures.OID.encode(), b"%024x" % i) for i in range(count)]
    spent = Steps()

    def accept(group: list[bytes]) -> None:
        now = time.time()
        for raw in group:
            ingest.accept(raw, now)

    for start in range(0, count, GROUP):
        spent.run("envelope and routing", functools.partial(accept, raws[start : start + GROUP]))
        queue.committed = spent.run(
            "group commit", lambda: queue.write(queue.take_pending(), sync=True)
        )
    records, end, _ = spent.run("cut: read back", lambda: queue.read(1 << 62, 1 << 62))
    data = spent.run("cut: NDJSON", lambda: formats.encode("ndjson", records, None, "none"))
    manifest = queue.new_manifest(
        name="perrecord.ndjson",
        records=len(records),
        size=len(data),
        opened=0.0,
        cut=0.0,
        end=end,
        content_type=formats.CONTENT_TYPES["ndjson"],
    )
    spent.run("cut: write and sync", lambda: queue.persist_batch(manifest, data))
    queue.close()
    return [(step, 1e6 * seconds / count) for step, seconds in spent.spent.items()]


def line(work: Path, count: int) -> str:
    """One sentence for the report."""
    costs = steps(work, count)
    total = sum(cpu for _, cpu in costs)
    parts = "; ".join(f"{step} {cpu:.1f}" for step, cpu in costs)
    return (
        f"The daemon's own work per record, in-process ({count:,} records, no HTTP, "
        f"`bench/perrecord.py`): {total:.1f} µs of CPU ({parts})."
    )


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 75_000
    with tempfile.TemporaryDirectory(prefix="firehosed-perrecord-") as tmp:
        for step, cpu in steps(Path(tmp), count):
            print(f"{step}: {cpu:.2f} µs of CPU per record")
