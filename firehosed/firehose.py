"""A firehose at run time: its config, its durable queue and what routing needs of it."""

from __future__ import annotations

from firehosed.config import FirehoseConfig
from firehosed.mapping import Mapping
from firehosed.queue.base import Queue


class Firehose:
    """One route: which signals of an account, in what format, to which channel."""

    def __init__(
        self, name: str, config: FirehoseConfig, queue: Queue, mapping: Mapping | None
    ) -> None:
        self.name = name
        self.queue = queue
        self.configure(config, mapping)

    def configure(self, config: FirehoseConfig, mapping: Mapping | None) -> None:
        """Apply a (re)loaded config; queued records and cut batches are kept as they are."""
        self.config = config
        self.mapping = mapping
        self.types = frozenset(config.types)

    def admits(self, signal_type: str) -> bool:
        """Whether this firehose's `types` lets a signal of `signal_type` through."""
        return not self.types or signal_type in self.types
