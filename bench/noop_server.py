"""The no-op ceiling: an aiohttp + uvloop server that does only what any handler must.

It reads the body, decodes every record into the full `fixtures.Signal` Struct with
msgspec (one JSON object, an array, or NDJSON), and answers 202 with the same JSON shape
the daemon does. No auth, no queue, no fsync: the best an aiohttp handler on this
machine can do with these payloads, measured with the same wrk, pinning and bodies. Like
the daemon, it is served by aiohttp's low-level server (`web.Server`, one handler that
looks at the path itself); `--app` serves it through an `Application` and its router
instead, the usual way, which costs a quarter of the throughput here.

With `--relay URL` it is the latency ceiling instead: after the 202 it POSTs the
request's records as one JSON array to URL (a webhook), as the daemon does after its
fsync and batch cut: the two HTTP hops any POST → webhook path must pay.

With `--journal FILE` it is the durable floor (bench/decompose.py): before the 202 it
appends the body to FILE and waits for an fdatasync shared by every request waiting at
the time (group commit, in a thread): the least any handler that answers only once a
signal is on disk must do on top of the no-op.

Run: python -m bench.noop_server --port N [--relay URL] [--journal FILE] [--app]
"""

from __future__ import annotations

import argparse
import asyncio
import os

import aiohttp
import msgspec
import uvloop
from aiohttp import web

from bench.fixtures import Signal

_one_or_many = msgspec.json.Decoder(Signal | list[Signal])
_lines = msgspec.json.Decoder(Signal)
_pending: set[asyncio.Task[None]] = set()


class Journal:
    """Append-only file with group commit: one write and fdatasync per round."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.bodies: list[bytes] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.task: asyncio.Task[None] | None = None

    async def append(self, body: bytes) -> None:
        """Return once `body` is written and synced."""
        waiter = asyncio.get_running_loop().create_future()
        self.bodies.append(body)
        self.waiters.append(waiter)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._commit())
        await waiter

    async def _commit(self) -> None:
        while self.bodies:
            data, self.bodies = b"".join(self.bodies), []
            waiters, self.waiters = self.waiters, []
            await asyncio.to_thread(self._write, data)
            for waiter in waiters:
                waiter.set_result(None)

    def _write(self, data: bytes) -> None:
        os.write(self.fd, data)
        os.fdatasync(self.fd)


class Noop:
    """The no-op handler, with its optional journal and relay."""

    def __init__(self, relay: str | None, journal: str | None) -> None:
        self.relay = relay
        self.journal = Journal(journal) if journal else None
        self.client: aiohttp.ClientSession | None = None

    async def handle(self, request: web.BaseRequest) -> web.Response:
        """The low-level server's one handler: POST to a signals path, or /healthz."""
        if request.method == "POST" and request.path.endswith("/signals"):
            return await self.post_signals(request)
        if request.path == "/healthz":
            return await self.healthz(request)
        return web.Response(status=404)

    async def post_signals(self, request: web.BaseRequest) -> web.Response:
        """Decode the body into Signals; 202 with the count (and relay the records)."""
        length = request.content_length
        body = await (request.content.readexactly(length) if length else request.content.read())
        if request.content_type == "application/x-ndjson":
            count = len(_lines.decode_lines(body))
            array = b"[" + b",".join(line for line in body.split(b"\n") if line) + b"]"
        else:
            decoded = _one_or_many.decode(body)
            count = len(decoded) if isinstance(decoded, list) else 1
            array = body if isinstance(decoded, list) else b"[" + body + b"]"
        if self.journal is not None:
            await self.journal.append(body)
        if self.client is not None:
            task = asyncio.create_task(self._relay(self.client, array))
            _pending.add(task)
            task.add_done_callback(_pending.discard)
        return web.Response(
            status=202,
            body=msgspec.json.encode({"accepted": count, "duplicates": 0, "rejected": []}),
            content_type="application/json",
        )

    async def healthz(self, request: web.BaseRequest) -> web.Response:
        """Alive."""
        return web.Response(text="ok")

    async def _relay(self, client: aiohttp.ClientSession, array: bytes) -> None:
        assert self.relay is not None
        headers = {"Content-Type": "application/json"}
        async with client.post(self.relay, data=array, headers=headers) as response:
            await response.read()


def runner_for(noop: Noop, app: bool) -> web.BaseRunner:
    """aiohttp's low-level server, or (`app`) an Application with a router."""
    if not app:
        return web.ServerRunner(web.Server(noop.handle, access_log=None), handle_signals=True)
    application = web.Application()
    application.router.add_post("/v1/accounts/{account}/signals", noop.post_signals)
    application.router.add_get("/healthz", noop.healthz)
    return web.AppRunner(application, access_log=None, handle_signals=True)


async def serve(port: int, relay: str | None, journal: str | None, app: bool) -> None:
    """Serve until killed."""
    noop = Noop(relay, journal)
    if relay:
        noop.client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    runner = runner_for(noop, app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    try:
        await asyncio.Event().wait()
    finally:
        if noop.client is not None:
            await noop.client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--relay", help="POST each request's records to this URL after 202")
    parser.add_argument("--journal", help="append and fdatasync each body here before 202")
    parser.add_argument("--app", action="store_true", help="an Application and its router")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, args.relay, args.journal, args.app))


if __name__ == "__main__":
    main()
