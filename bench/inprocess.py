"""firehosed's ingest path without HTTP, for the in-process benchmarks.

`EnvelopeReader.read` then `Router.route`, as `firehosed/ingest/app.py` calls them, so
the memory and recovery benchmarks stage records exactly as the daemon would and follow
any change to the record format or routing without edits here.
"""

from __future__ import annotations

from typing import Any

from firehosed.catchup import CatchUp
from firehosed.config import CatchUpConfig, FieldsConfig, FirehoseConfig
from firehosed.envelope import EnvelopeReader
from firehosed.firehose import Firehose
from firehosed.queue.commit import Committer
from firehosed.queue.store import FirehoseQueue
from firehosed.router import AccountRoutes, Router

ACCOUNT = "bench"


class Ingest:
    """One account (default field paths) routing to `firehoses`."""

    def __init__(
        self,
        firehoses: list[tuple[str, FirehoseQueue, dict[str, Any]]],
        catch_up: CatchUpConfig | None = None,
    ) -> None:
        self.catch_up = CatchUp(catch_up or CatchUpConfig())
        self.router = Router(self.catch_up, Committer("fsync"))
        self.reader = EnvelopeReader(FieldsConfig())
        routes = [
            Firehose(name, FirehoseConfig(account=ACCOUNT, channel="bench", **keys), queue, None)
            for name, queue, keys in firehoses
        ]
        self.router.accounts[ACCOUNT] = AccountRoutes(FieldsConfig(), routes)

    def accept(self, raw: bytes, received: float) -> None:
        """Read the envelope and route the record (dedupe and the 202 left out)."""
        self.router.route(ACCOUNT, self.reader.read(raw, received), raw, received)
