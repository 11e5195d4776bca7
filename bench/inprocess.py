"""firehosed's ingest path without HTTP, for the in-process benchmarks.

`EnvelopeReader.read` then routing, as `firehosed/ingest/receiver.py` calls them, so
the memory and recovery benchmarks stage records exactly as the daemon would and follow
any change to the record format or routing without edits here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from firehosed.catchup import CatchUp
from firehosed.config import CatchUpConfig, FirehoseConfig
from firehosed.envelope import EnvelopeReader
from firehosed.fields import FieldsConfig
from firehosed.firehose import Firehose
from firehosed.queue.base import Ticket
from firehosed.queue.commit import Committer
from firehosed.queue.local import LocalQueue
from firehosed.queue.store import SegmentStore
from firehosed.router import AccountRoutes, Router

ACCOUNT = "bench"


class Ingest:
    """One account (default field paths) routing to `firehoses`."""

    def __init__(
        self,
        firehoses: list[tuple[str, SegmentStore, dict[str, Any]]],
        catch_up: CatchUpConfig | None = None,
    ) -> None:
        self.catch_up = CatchUp(catch_up or CatchUpConfig())
        self.router = Router(self.catch_up)
        self.reader = EnvelopeReader(FieldsConfig())
        committer = Committer("fsync")  # never run: the caller writes the stores itself
        routes = [
            Firehose(
                name,
                FirehoseConfig(account=ACCOUNT, channel="bench", **keys),
                LocalQueue(store, committer, Path("/nonexistent")),
                None,
            )
            for name, store, keys in firehoses
        ]
        self.router.accounts[ACCOUNT] = AccountRoutes(FieldsConfig(), routes)

    def accept(self, raw: bytes, received: float) -> None:
        """Read the envelope and route the record (dedupe and the 202 left out)."""
        self.accept_all([raw], received)

    def accept_all(self, raws: list[bytes], received: float) -> None:
        """Read the envelopes and route one request's records (dedupe and the 202 left
        out; every record must be readable)."""
        envs, rejected = self.reader.read_all(raws, received)
        assert not rejected, rejected
        self.router.begin(ACCOUNT, Ticket()).route(envs, received)
