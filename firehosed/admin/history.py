"""The last hour, a second at a time: signals accepted and records delivered per second,
for the status page's charts.

Each series is a ring of SLOTS numbers, written once a second by one task (`run`) from
the Prometheus counters (what the counters gained since the last tick), so the hot path
does nothing for it and memory is fixed: two rings of 3600 floats.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Callable

from prometheus_client import Counter

from firehosed import metrics

SLOTS = 3600  # one per second: the last hour


def counter_total(counter: Counter) -> float:
    """A counter's value summed over every label set."""
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


class Series:
    """A ring of per-second rates of one ever-growing total."""

    def __init__(self, total: Callable[[], float]) -> None:
        self._total = total
        self._last = total()
        self._values = array("d", bytes(8 * SLOTS))
        self._next = 0  # the slot the next sample goes in (the oldest one)

    def sample(self) -> None:
        now = self._total()
        self._values[self._next] = max(0.0, now - self._last)
        self._last = now
        self._next = (self._next + 1) % SLOTS

    def values(self) -> list[float]:
        """The last SLOTS samples, oldest first."""
        return [*self._values[self._next :], *self._values[: self._next]]


class History:
    """Accepted signals and delivered records per second over the last hour."""

    def __init__(self) -> None:
        self.accepted = Series(lambda: counter_total(metrics.signals_accepted))
        self.delivered = Series(lambda: counter_total(metrics.records_delivered))

    def sample(self) -> None:
        self.accepted.sample()
        self.delivered.sample()

    async def run(self) -> None:
        """Sample once a second, on the second's boundary of the monotonic clock."""
        while True:
            await asyncio.sleep(1.0 - time.monotonic() % 1.0)
            self.sample()
