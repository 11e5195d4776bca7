"""Crash points for the fault suite: die like `kill -9` at a named step of a batch's life.

Set `FIREHOSED_CRASH_AT=<point>` in the daemon's environment (tests only). Read once at
import; an unset variable costs one string comparison per point reached.

Points: `ingest.after_append` (records staged, not yet synced), `ingest.after_fsync`
(synced, 202 not yet sent), `batch.after_cut` (batch fixed on disk, not yet put),
`channel.mid_upload` (directory channel: part file half written), `batch.after_put`
(delivered, not yet marked done), `queue.mid_segment_delete` (between segment unlinks).
"""

from __future__ import annotations

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


def crash_point(name: str) -> None:
    """Exit at once, without cleanup, if the fault suite armed this point."""
    if name == _ARMED:
        os._exit(137)
