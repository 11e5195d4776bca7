"""The no-op ceiling: an aiohttp + uvloop server that does only what any handler must.

It reads the body, decodes every record into the full `fixtures.Signal` Struct with
msgspec (one JSON object, an array, or NDJSON), and answers 202 with the same JSON shape
the daemon does. No auth, no queue, no fsync: the best an aiohttp handler on this
machine can do with these payloads, measured with the same wrk, pinning and bodies.

With `--relay URL` it is the latency ceiling instead: after the 202 it POSTs the
request's records as one JSON array to URL (a webhook), as the daemon does after its
fsync and batch cut: the two HTTP hops any POST → webhook path must pay.

With `--journal FILE` it is the durable floor (bench/decompose.py): before the 202 it
appends the body to FILE and waits for an fdatasync shared by every request waiting at
the time (group commit, in a thread): the least any handler that answers only once a
signal is on disk must do on top of the no-op.

Run: python -m bench.noop_server --port N [--relay URL] [--journal FILE]
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


RELAY: web.AppKey[str] = web.AppKey("relay")
CLIENT: web.AppKey[aiohttp.ClientSession] = web.AppKey("client")
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


JOURNAL: web.AppKey[Journal] = web.AppKey("journal")


async def post_signals(request: web.Request) -> web.Response:
    """Decode the body into Signals; 202 with the count (and relay the records)."""
    body = await request.read()
    if request.content_type == "application/x-ndjson":
        count = len(_lines.decode_lines(body))
        array = b"[" + b",".join(line for line in body.split(b"\n") if line) + b"]"
    else:
        decoded = _one_or_many.decode(body)
        count = len(decoded) if isinstance(decoded, list) else 1
        array = body if isinstance(decoded, list) else b"[" + body + b"]"
    if JOURNAL in request.app:
        await request.app[JOURNAL].append(body)
    if RELAY in request.app:
        task = asyncio.create_task(_relay(request.app, array))
        _pending.add(task)
        task.add_done_callback(_pending.discard)
    return web.Response(
        status=202,
        body=msgspec.json.encode({"accepted": count, "duplicates": 0, "rejected": []}),
        content_type="application/json",
    )


async def _relay(app: web.Application, array: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    async with app[CLIENT].post(app[RELAY], data=array, headers=headers) as response:
        await response.read()


async def healthz(request: web.Request) -> web.Response:
    """Alive."""
    return web.Response(text="ok")


async def serve(port: int, relay: str | None, journal: str | None) -> None:
    """Serve until killed."""
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/accounts/{account}/signals", post_signals)
    app.router.add_get("/healthz", healthz)
    if journal:
        app[JOURNAL] = Journal(journal)
    if relay:
        app[RELAY] = relay
        app[CLIENT] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    try:
        await asyncio.Event().wait()
    finally:
        if relay:
            await app[CLIENT].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--relay", help="POST each request's records to this URL after 202")
    parser.add_argument("--journal", help="append and fdatasync each body here before 202")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, args.relay, args.journal))


if __name__ == "__main__":
    main()
