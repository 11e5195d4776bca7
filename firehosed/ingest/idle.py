"""The daemon's own bound on idle connections: `server.idle_timeout`.

A connection is idle from the moment it is first seen, and again from the end of each
answer, until a request handler runs on it; idle for `idle_timeout`, it is closed:
silent and slowloris clients (no complete request head) and idle keep-alive alike.

aiohttp's keep-alive timer (`keepalive_timeout`) does the same in the versions firehosed
runs on today, but what it covers has changed between releases (older ones armed it only
after a first answer, so a silent connection was held forever). This reaper depends only
on the server's public `connections`, `request_handler` and each connection's transport,
so the bound holds whatever aiohttp's timer does.

Invariant: a connection whose handler is running is never closed here (a slow body is
`body_timeout`'s business, a long replay stream is wanted); every other connection is
closed at most `idle_timeout` plus two sweeps after it went idle, never before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

SWEEPS_PER_TIMEOUT = 4
MAX_SWEEP_INTERVAL = 1.0  # seconds


def reap(server: web.Server, idle_timeout: float) -> Coroutine[Any, Any, None]:
    """Watch `server`'s connections (from now: call before it accepts any) and return
    the sweeping coroutine for the caller to run as a tracked task."""
    return IdleReaper(server, idle_timeout).run()


class IdleReaper:
    """Tracks when each connection of `server` went idle and closes those idle too long.

    Wraps `server.request_handler` (aiohttp hands it to each connection as it opens),
    costing one extra coroutine frame and two dict writes per request.
    """

    def __init__(self, server: web.Server, idle_timeout: float) -> None:
        self._server = server
        self._timeout = idle_timeout
        self._loop = asyncio.get_running_loop()
        self._handler = server.request_handler
        self._busy: dict[web.RequestHandler, int] = {}  # connection -> handlers running
        self._idle_since: dict[web.RequestHandler, float] = {}  # loop time
        server.request_handler = self._handle

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        connection = request.protocol
        self._busy[connection] = self._busy.get(connection, 0) + 1
        try:
            return await self._handler(request)
        finally:
            self._idle_since[connection] = self._loop.time()
            if (running := self._busy.pop(connection) - 1) > 0:
                self._busy[connection] = running

    async def run(self) -> None:
        """Sweep every `idle_timeout / 4` (at most a second) until cancelled."""
        if self._timeout <= 0:
            return
        interval = min(MAX_SWEEP_INTERVAL, self._timeout / SWEEPS_PER_TIMEOUT)
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    def sweep(self) -> int:
        """Close every connection idle for `idle_timeout`; how many were closed."""
        now = self._loop.time()
        live = self._server.connections
        for gone in self._idle_since.keys() - set(live):
            del self._idle_since[gone]
        closed = 0
        for connection in live:
            if connection in self._busy:
                continue
            since = self._idle_since.setdefault(connection, now)
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
