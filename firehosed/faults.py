"""Crash points for the fault suite: die like `kill -9` at a named step of a batch's life.

Set `FIREHOSED_CRASH_AT=<point>` in the daemon's environment (tests only). Read once at
import; an unset variable costs one string comparison per point reached.

Points: `ingest.after_append` (records staged, not yet synced), `ingest.after_fsync`
(synced, 202 not yet sent), `batch.after_cut` (batch fixed on disk, not yet put),
`channel.mid_upload` (directory channel: part file half written), `batch.after_put`
(delivered, not yet marked done), `queue.mid_segment_delete` (between segment unlinks).
Fail points (`FIREHOSED_FAIL_AT`): `queue.fsync`.
"""

from __future__ import annotations

import errno
import itertools
import os

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
# FIREHOSED_FAIL_AT="queue.fsync:N:K": the Nth to (N+K-1)th time the point is reached,
# raise EIO, as a dying disk does (no real disk fails an fsync on cue).
_FAIL_NAME, _, _FAIL_RANGE = os.environ.get("FIREHOSED_FAIL_AT", "").partition(":")
_FAIL_FROM, _, _FAIL_COUNT = _FAIL_RANGE.partition(":")
_calls = itertools.count(1)


def crash_point(name: str) -> None:
    """Exit at once, without cleanup, if the fault suite armed this point."""
    if name == _ARMED:
        os._exit(137)


def fail_point(name: str) -> None:
    """Raise OSError(EIO) if the fault suite armed this point for this call."""
    if name != _FAIL_NAME:
        return
    call, start = next(_calls), int(_FAIL_FROM or 1)
    if start <= call < start + int(_FAIL_COUNT or 1):
        raise OSError(errno.EIO, f"injected failure at {name}")
