"""The daemon's own bound on idle connections (`firehosed.ingest.idle`), on a real aiohttp
server whose keep-alive timer is set far out (`keepalive_timeout=3600`), i.e. an aiohttp
that would not close anything itself: silent, slowloris and idle keep-alive connections
are still closed after `idle_timeout`, never before, and a connection whose request is
being handled is never cut.

tests/faults/test_hostile_input.py checks the same limits against the whole daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from firehosed.ingest import idle
from firehosed.ingest.routes import Routes, get
from tests.daemon import free_port

IDLE = 1.0  # seconds
SLOW_ANSWER = 2.5 * IDLE
GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
GET_SLOW = b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def handler(request: web.BaseRequest) -> web.Response:
    if request.path == "/slow":
        await asyncio.sleep(SLOW_ANSWER)
    return web.Response(text="ok")


async def routed(api: object, request: web.BaseRequest, name: str) -> web.Response:
    return await handler(request)


@pytest.fixture
async def server_port() -> AsyncIterator[int]:
    """A low-level aiohttp server, as the daemon builds it: a `Routes` dispatcher noting
    busy connections in the reaper's `since`, and the reaper's sweep running."""
    sweeper = idle.IdleReaper(IDLE)
    routes = Routes({"/": get(routed), "/slow": get(routed)}, idle=sweeper.since)
    server = web.Server(
        functools.partial(routes.dispatch, None), access_log=None, keepalive_timeout=3600
    )
    reaper = asyncio.create_task(sweeper.run(server))
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper
        await runner.cleanup()


Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@pytest.fixture
async def connect(server_port: int) -> AsyncIterator[Connect]:
    """Open client connections to the server; all closed at the end, pass or fail."""
    writers: list[asyncio.StreamWriter] = []

    async def open_one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server_port)
        writers.append(writer)
        return reader, writer

    try:
        yield open_one
    finally:
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def closed_after(reader: asyncio.StreamReader, started: float, limit: float) -> float:
    """Seconds from `started` until the server closed the connection (reading any answer
    on the way); fails after `limit`."""
    async with asyncio.timeout(limit):
        while await reader.read(65536):
            pass
    return time.monotonic() - started


async def trickle(writer: asyncio.StreamWriter) -> None:
    """A slowloris: the head of a request, one byte at a time, never finished."""
    writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    with contextlib.suppress(ConnectionError):
        while not writer.is_closing():
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.1)


async def test_idle_connections_are_closed_by_the_reaper_alone(connect: Connect) -> None:
    opened = time.monotonic()
    silent, slowloris, kept_alive = await connect(), await connect(), await connect()
    kept_alive[1].write(GET)
    assert (await kept_alive[0].readuntil(b"ok")).startswith(b"HTTP/1.1 200")
    answered = time.monotonic()
    trickling = asyncio.create_task(trickle(slowloris[1]))
    limit = IDLE + 2.0
    try:
        times = await asyncio.gather(
            closed_after(silent[0], opened, limit),
            closed_after(slowloris[0], opened, limit),
            closed_after(kept_alive[0], answered, limit),
        )
    finally:
        trickling.cancel()
    assert all(IDLE <= t <= IDLE + 1.0 for t in times), times


async def test_a_connection_being_answered_is_not_cut(connect: Connect) -> None:
    reader, writer = await connect()
    started = time.monotonic()
    writer.write(GET_SLOW)
    answer = await asyncio.wait_for(reader.readuntil(b"ok"), SLOW_ANSWER + 2)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert time.monotonic() - started >= SLOW_ANSWER  # busy for more than idle_timeout
    answered = time.monotonic()
    # idle again from its answer: closed one idle_timeout later
    assert IDLE <= await closed_after(reader, answered, IDLE + 2.0) <= IDLE + 1.0


async def test_without_an_idle_timeout_nothing_is_closed_and_nothing_is_remembered() -> None:
    """`idle_timeout = 0`: no connection is closed by the sweep, and the connections that
    went are forgotten (one entry per connection ever seen would grow without bound)."""
    sweeper = idle.IdleReaper(0)
    routes = Routes({"/": get(routed)}, idle=sweeper.since)
    server = web.Server(functools.partial(routes.dispatch, None), access_log=None)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    sweeping = asyncio.create_task(sweeper.run(server))
    try:
        kept_reader, kept_writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GET)
            assert (await ok_answer(reader)).startswith(b"HTTP/1.1 200 OK")
            writer.close()
            await writer.wait_closed()
        kept_writer.write(GET)
        assert (await ok_answer(kept_reader)).startswith(b"HTTP/1.1 200 OK")
        await asyncio.sleep(idle.MAX_SWEEP_INTERVAL * 2.5)
        assert set(sweeper.since) == set(server.connections)  # the five that went: forgotten
        assert len(server.connections) == 1  # the idle one: still open
        kept_writer.write(GET)
        assert (await ok_answer(kept_reader)).startswith(b"HTTP/1.1 200 OK")
        kept_writer.close()
        await kept_writer.wait_closed()
    finally:
        sweeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeping
        await runner.cleanup()


async def ok_answer(reader: asyncio.StreamReader) -> bytes:
    """One whole answer of `handler` ("ok"): its head, its two-byte body read too."""
    head = await reader.readuntil(b"\r\n\r\n")
    assert await reader.readexactly(2) == b"ok"
    return head
