"""What the daemon's work costs per record, in-process, step by step.

Records (cart-abandon, distinct ids) go through the daemon's own code in two forms:
one at a time as single-signal POSTs bring them (a group commit of every 32), and as
NDJSON requests of BATCH (the body split into lines, dedupe, one group commit per
request). Each: envelope decode and routing into a firehose queue
(`bench.inprocess.Ingest`), the group commit (write and fdatasync, as under
load), then one file batch cut the way a file firehose's worker makes it:
`SegmentStore.read`, NDJSON `formats.encode_batch`, `SegmentStore.persist_batch`. Each step's
CPU per record is this thread's CPU clock (user and kernel, to the nanosecond), so the
kernel's share (syncs, reading the segments back, writing the batch) is counted. No
HTTP, no event loop, one thread.

Alone: `python -m bench.perrecord [RECORDS]` (in a temp dir under /tmp). The batch
form's total is the figure of the batch-speed target (at most 4 µs).
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
from firehosed.dedupe import Dedupe
from firehosed.ingest.body import quick_split, split
from firehosed.queue.base import Ticket
from firehosed.queue.store import SegmentStore

T = TypeVar("T")
GROUP = 32  # requests per fsync round in the single-signal figure
BATCH = 1000  # records per request in the batch figure


class Steps:
    """CPU seconds (this thread, user and kernel) spent in each named step, summed."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def run(self, step: str, work: Callable[[], T]) -> T:
        before = time.thread_time()
        out = work()
        self.spent[step] = self.spent.get(step, 0.0) + time.thread_time() - before
        return out


def steps(work: Path, count: int, batch: int = 1) -> list[tuple[str, float]]:
    """(step, CPU µs per record), for `count` records, `batch` per request."""
    queue = SegmentStore(work / f"perrecord-{batch}", "perrecord", 1 << 30, sync=True)
    queue.open()
    ingest = Ingest([("perrecord", queue, {"format": "ndjson"})])
    template = msgspec.json.encode(fixtures.cart_abandon(anonymous=False))
    raws = [
        template.replace(fixtures.OID.encode(), b"%024x" % i).replace(
            fixtures.SID.encode(), b"%08x" % (i // fixtures.SIGNALS_PER_SESSION)
        )
        for i in range(count)
    ]
    spent = Steps()
    dedupe = Dedupe(3600.0, 10 * count, 1 << 40)

    def accept(group: list[bytes]) -> None:
        now = time.time()
        for raw in group:
            ingest.accept(raw, now)

    def accept_all(body: bytes) -> None:
        now = time.time()
        lines = quick_split(body, "ndjson") or split(body, "ndjson")
        envs, _ = ingest.reader.read_all(lines, now)
        assert not dedupe.admit(envs.ids, now, Ticket())
        ingest.router.begin("bench", Ticket()).route(envs, now)

    group = GROUP if batch == 1 else batch
    for start in range(0, count, group):
        some = raws[start : start + group]
        if batch == 1:
            spent.run("envelope and routing", functools.partial(accept, some))
        else:
            body = b"\n".join([*some, b""])
            spent.run("body, envelope, dedupe and routing", functools.partial(accept_all, body))
        queue.committed = spent.run(
            "group commit", lambda: queue.write(queue.take_pending(), sync=True)
        )
    records, end, _ = spent.run("cut: read back", lambda: queue.read(1 << 62, 1 << 62))
    data = spent.run("cut: NDJSON", lambda: formats.encode_batch("ndjson", records, None, "none"))
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
    forms = []
    for batch in (1, BATCH):
        costs = steps(work, count, batch)
        total = sum(cpu for _, cpu in costs)
        parts = "; ".join(f"{step} {cpu:.1f}" for step, cpu in costs)
        label = "single signals" if batch == 1 else f"NDJSON requests of {batch}"
        forms.append(f"{label}: {total:.1f} µs of CPU ({parts})")
    return (
        f"The daemon's own work per record, in-process ({count:,} records, no HTTP, "
        f"`bench/perrecord.py`): {'. '.join(forms)}."
    )


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 75_000
    with tempfile.TemporaryDirectory(prefix="firehosed-perrecord-") as tmp:
        for batch in (1, BATCH):
            costs = steps(Path(tmp), count, batch)
            print(f"{'single signals' if batch == 1 else f'requests of {batch}'}:")
            for step, cpu in costs:
                print(f"  {step}: {cpu:.2f} µs of CPU per record")
            print(f"  total: {sum(cpu for _, cpu in costs):.2f} µs")
