"""A live tap on what the daemon does: accepted signals and delivered batches, for
`GET /v1/tail` on the admin listener (`firehosed tail`).

Publishers check `tap.listening` (one attribute) before building an event, so the hot
path costs nothing more while nobody follows. Each subscriber has its own bounded
queue: a reader that falls behind loses events (counted, and told with a `dropped`
event where they went missing), never slows the daemon or another reader, and memory
never grows past `size` events per reader.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

Event = dict[str, Any]


class Subscriber:
    """One reader's queue of events, at most `size` of them; `firehose`: only its events."""

    def __init__(self, tap: Tap, firehose: str | None, size: int) -> None:
        self.firehose = firehose
        self.dropped = 0  # lost since the last event that got through
        self.dropped_total = 0
        self._tap = tap
        self._size = size
        self._events: deque[Event | None] = deque()
        self._ready = asyncio.Event()

    def offer(self, event: Event) -> None:
        """Queue `event` if there is room (for it and a `dropped` notice before it)."""
        if self.firehose is not None and self.firehose not in event.get("firehoses", ()):
            return
        room = self._size - len(self._events)
        if room < (2 if self.dropped else 1):
            self.dropped += 1
            self.dropped_total += 1
            return
        if self.dropped:
            self._events.append({"event": "dropped", "dropped": self.dropped})
            self.dropped = 0
        self._events.append(event)
        self._ready.set()

    def end(self) -> None:
        """No more events: `next()` answers None once the queue is read."""
        self._events.append(None)
        self._ready.set()

    async def next(self, idle: float) -> Event | None:
        """The next event; None when the tap closed; {} after `idle` seconds without one."""
        if not self._events:
            self._ready.clear()
            try:
                async with asyncio.timeout(idle):
                    await self._ready.wait()
            except TimeoutError:
                return {}
        return self._events.popleft()

    def close(self) -> None:
        """Leave the tap."""
        self._tap.unsubscribe(self)


class Tap:
    """In-process publish/subscribe of live events, written by the receiver and the
    delivery workers, read by the admin listener's tail."""

    def __init__(self) -> None:
        self.listening = False  # whether anyone follows: publishers check it first
        self._subscribers: set[Subscriber] = set()

    def subscribe(self, firehose: str | None = None, size: int = 1024) -> Subscriber:
        subscriber = Subscriber(self, firehose, size)
        self._subscribers.add(subscriber)
        self.listening = True
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        self.listening = bool(self._subscribers)

    def publish(self, event: Event) -> None:
        """Offer `event` to every subscriber (its `firehoses` say whose it is)."""
        for subscriber in self._subscribers:
            subscriber.offer(event)

    def close(self) -> None:
        """End every subscriber's stream (the daemon stops)."""
        for subscriber in list(self._subscribers):
            subscriber.end()
