"""Crash and fail points for the fault suite: die like `kill -9`, or fail like a dying
disk (or a bug), at a named step of a batch's life.

Set `FIREHOSED_CRASH_AT=<point>` in the daemon's environment (tests only). Read once at
import; an unset variable costs one string comparison per point reached.

Points: `ingest.after_append` (records staged, not yet synced), `ingest.after_fsync`
(synced, 202 not yet sent), `batch.after_cut` (batch fixed on disk, not yet put),
`channel.mid_upload` (directory channel: part file half written), `batch.after_put`
(delivered, not yet marked done), `queue.mid_segment_delete` (between segment unlinks).

Fail points (`FIREHOSED_FAIL_AT`, tests only): `queue.fsync` (a group commit's sync),
`queue.rotate` (the directory sync that makes a new segment file durable),
`queue.commit_bug` (inside the commit thread's write), `fileio.dir_fsync` (any directory
sync that makes a new name durable), `import.save` (writing an import run's progress:
its errors file and run.json), `import.run_save` (any other save of an import run's
run.json), `import.settle_bug` (counting a chunk of import rows that was kept). The
variable is one or more comma-separated `POINT:N:K[:DELAY]`: the Nth to (N+K-1)th
time POINT is reached (N and K default to 1; each point counts its own calls), sleep
DELAY seconds if given (a slow disk), then raise OSError(EIO), as a dying disk does
(no real disk fails on cue); a point whose name ends in `_bug` raises RuntimeError
instead, as a bug would. Examples:
`queue.fsync:4:3` (calls 4, 5, 6 fail), `queue.fsync:1:1:2.5` (the first sync takes
2.5 s, then fails), `queue.fsync:5:1,queue.fsync:9:1` (calls 5 and 9 fail).
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Iterator
from typing import NamedTuple

POINTS = frozenset(
    {
        "ingest.after_append",
        "ingest.after_fsync",
        "batch.after_cut",
        "channel.mid_upload",
        "batch.after_put",
        "queue.mid_segment_delete",
    }
)
_ARMED = os.environ.get("FIREHOSED_CRASH_AT")


class _Failure(NamedTuple):
    """One armed range of a fail point: calls `first` to `first + times - 1` fail."""

    first: int
    times: int
    delay: float


def _parse(value: str) -> dict[str, list[_Failure]]:
    armed: dict[str, list[_Failure]] = {}
    for spec in filter(None, (s.strip() for s in value.split(","))):
        name, *numbers = spec.split(":")
        first, count, delay = (*numbers, "", "", "")[:3]
        failure = _Failure(int(first or 1), int(count or 1), float(delay or 0))
        armed.setdefault(name, []).append(failure)
    return armed


_FAILS = _parse(os.environ.get("FIREHOSED_FAIL_AT", ""))
# One call counter per armed point (next() on a count is atomic: commit threads share it).
_calls: dict[str, Iterator[int]] = {name: itertools.count(1) for name in _FAILS}


def crash_point(name: str) -> None:
    """Exit at once, without cleanup, if the fault suite armed this point."""
    if name == _ARMED:
        os._exit(137)


def fail_point(name: str) -> None:
    """Fail this call of `name` if the fault suite armed it: OSError(EIO), or
    RuntimeError for a `_bug` point; after the armed delay, if any (blocks: threads only)."""
    failures = _FAILS.get(name)
    if failures is None:
        return
    call = next(_calls[name])
    for failure in failures:
        if failure.first <= call < failure.first + failure.times:
            if failure.delay:
                time.sleep(failure.delay)
            if name.endswith("_bug"):
                raise RuntimeError(f"injected bug at {name}")
            raise OSError(errno.EIO, f"injected failure at {name}")
