"""The daemon's own bound on idle connections: `server.idle_timeout`.

A connection is idle from the moment it is first seen, and again from the end of each
answer, until a request handler runs on it; idle for `idle_timeout`, it is closed:
silent and slowloris clients (no complete request head) and idle keep-alive alike.

aiohttp's keep-alive timer (`keepalive_timeout`) does the same in the versions firehosed
runs on today, but what it covers has changed between releases (older ones armed it only
after a first answer, so a silent connection was held forever). This reaper depends only
on the server's public `connections`, each connection's transport and the stamps its
dispatcher keeps, so the bound holds whatever aiohttp's timer does.

Invariant: a connection whose handler is running is never closed here (a slow body is
`body_timeout`'s business, a long replay stream is wanted); every other connection is
closed at most `idle_timeout` plus two sweeps after it went idle, never before.
"""

from __future__ import annotations

import asyncio
import math
import time

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

SWEEPS_PER_TIMEOUT = 4
MAX_SWEEP_INTERVAL = 1.0  # seconds
BUSY = math.inf  # a connection's idle time while a handler runs on it: never idle


class IdleReaper:
    """Closes the connections of a server that stay idle too long.

    The server's dispatcher (`Routes`, given `since`) keeps `since`: connection ->
    `time.monotonic()` when it went idle, BUSY while a handler runs on it. aiohttp runs
    one connection's requests one after another, never two at once, so one entry per
    connection is enough.
    """

    def __init__(self, idle_timeout: float) -> None:
        self._timeout = idle_timeout
        self.since: dict[web.RequestHandler, float] = {}

    async def run(self, server: web.Server) -> None:
        """Sweep `server` every `idle_timeout / 4` (at most a second) until cancelled.
        With no `idle_timeout` (0) nothing is closed, but the sweep still forgets the
        connections that went, or `since` would grow by one entry per connection."""
        interval = MAX_SWEEP_INTERVAL
        if self._timeout > 0:
            interval = min(interval, self._timeout / SWEEPS_PER_TIMEOUT)
        while True:
            await asyncio.sleep(interval)
            self.sweep(server)

    def sweep(self, server: web.Server) -> int:
        """Close every connection of `server` idle for `idle_timeout`; how many were closed."""
        now = time.monotonic()
        live = server.connections
        for gone in self.since.keys() - set(live):
            del self.since[gone]
        if self._timeout <= 0:
            return 0
        closed = 0
        for connection in live:
            since = self.since.setdefault(connection, now)
            if now - since >= self._timeout and _close(connection.transport):
                closed += 1
        if closed:
            log.info("http.idle_closed", connections=closed, idle_timeout=self._timeout)
        return closed


def _close(transport: asyncio.BaseTransport | None) -> bool:
    """Close `transport`; abort it when an answer is still unread in its buffer (a client
    that reads nothing would otherwise keep it open). False if it was already closing."""
    if transport is None or transport.is_closing():
        return False
    if isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size():
        transport.abort()
    else:
        transport.close()
    return True
