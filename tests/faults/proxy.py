"""The fault suite's rig: a fault-injecting TCP proxy, and a watch on the daemon's process.

`FaultProxy` is for what no real destination does on cue.

The daemon is pointed at the proxy's port; the proxy forwards every byte to the real
server (`upstream`) and, switched at run time from the test, misbehaves like a network
or a server in trouble:

- `pass_()`: forward everything (the initial mode);
- `down()`: the destination is down: connections in flight are reset and new ones are
  refused (ECONNREFUSED: nothing listens on the port, which the proxy keeps reserved so
  no other socket can take it meanwhile);
- `slow(rate)`: forward at most `rate` bytes per second in each direction (all
  connections together share a direction's budget, like one thin link);
- `reset(after, direction, probability)`: once `after` bytes went through a connection
  in `direction`, each further chunk that way is, with `probability`, not forwarded
  and the connection is reset instead (RST, via SO_LINGER 0): "up" tears a request
  mid-way, "down" loses an answer the server already sent;
- `hang()`: accept and hold every byte without forwarding or answering.

It counts connections accepted and reset, and bytes forwarded each way.

`proxied(receiver)` puts a proxy in front of a webhook receiver, `received(receiver)`
counts the record ids it got, `until()` polls in the event loop. `ProcessWatch`
samples a process's resident memory and open file descriptors from /proc while a test
runs and keeps the peaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tests.servers.webhook import WebhookReceiver

Mode = Literal["pass", "down", "slow", "reset", "hang"]
Direction = Literal["up", "down"]

CHUNK = 64 * 1024


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's side, the upstream side, bytes forwarded."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    forwarded: dict[Direction, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    dropped: bool = False


@dataclass
class _ResetRule:
    after: int
    direction: Direction
    probability: float


class FaultProxy:
    """A TCP proxy from `port` on 127.0.0.1 to `upstream`; see the module docstring."""

    def __init__(self, upstream_host: str, upstream_port: int, *, seed: int = 1) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode: Mode = "pass"
        self.rate = 0
        self.rule = _ResetRule(0, "up", 1.0)
        self.connections = 0  # accepted
        self.resets = 0  # connections reset by the `reset` mode
        self.bytes: dict[Direction, int] = {"up": 0, "down": 0}
        self._random = random.Random(seed)
        self._links: set[_Link] = set()
        self._released = asyncio.Event()
        self._released.set()
        self._paced_until: dict[Direction, float] = {"up": 0.0, "down": 0.0}
        # Bound, never listening: keeps the port ours while the listener is closed.
        self._reserve = _reusable_socket()
        self._reserve.bind(("127.0.0.1", 0))
        self.port: int = self._reserve.getsockname()[1]
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        """`127.0.0.1:port`, where clients connect."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        """Listen on `port` (again, after `down`)."""
        if self._server is None:
            listener = _reusable_socket()
            listener.bind(("127.0.0.1", self.port))
            self._server = await asyncio.start_server(self._accept, sock=listener)
        return self

    async def close(self) -> None:
        """Stop listening, reset every connection, release the port."""
        await self._stop_listening()
        await self._reset_all()
        self._reserve.close()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- modes ------------------------------------------------------------------------

    async def pass_(self) -> None:
        """Forward everything, at full speed."""
        await self._switch("pass")

    async def down(self) -> None:
        """Reset connections in flight and refuse new ones until another mode."""
        self.mode = "down"
        await self._stop_listening()
        await self._reset_all()

    async def slow(self, rate: int) -> None:
        """Forward at most `rate` bytes per second each way (shared by all connections)."""
        self.rate = rate
        await self._switch("slow")

    async def reset(
        self, after: int, *, direction: Direction = "up", probability: float = 1.0
    ) -> None:
        """Reset connections past `after` bytes `direction`, at each chunk with `probability`."""
        self.rule = _ResetRule(after, direction, probability)
        await self._switch("reset")

    async def hang(self) -> None:
        """Accept connections, hold every byte, answer nothing."""
        self.mode = "hang"
        self._released.clear()
        await self.start()

    async def _switch(self, mode: Mode) -> None:
        self.mode = mode
        await self.start()
        self._released.set()

    # -- connections ------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "down":  # accepted in the instant before the listener closed
            _abort(writer)
            return
        self.connections += 1
        link = _Link(client=writer)
        self._links.add(link)
        try:
            up_reader, link.upstream = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._drop(link)  # upstream refused: so do we
            return
        if link.dropped:  # went down while connecting upstream
            _abort(link.upstream)
            return
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, link.upstream, "up")),
            asyncio.create_task(self._pump(link, up_reader, writer, "down")),
        ]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        self._links.discard(link)
        for side in (link.client, link.upstream):
            side.close()

    async def _pump(
        self,
        link: _Link,
        source: asyncio.StreamReader,
        target: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        """Copy one direction until EOF, applying the mode to every chunk."""
        try:
            while chunk := await source.read(self._chunk_size()):
                await self._released.wait()  # hang: hold the bytes read
                if self._reset_due(link, direction, len(chunk)):
                    await self._forward(link, target, direction, chunk[: self._room(link)])
                    self.resets += 1
                    self._drop(link)
                    return
                await self._pace(direction, len(chunk))
                await self._forward(link, target, direction, chunk)
            if target.can_write_eof():
                target.write_eof()
        except OSError:  # a side reset or closed under us
            self._drop(link)

    async def _forward(
        self, link: _Link, target: asyncio.StreamWriter, direction: Direction, data: bytes
    ) -> None:
        if data:
            target.write(data)
            await target.drain()
            link.forwarded[direction] += len(data)
            self.bytes[direction] += len(data)

    def _chunk_size(self) -> int:
        # Small reads when slow, so pacing is smooth rather than one burst per second.
        return max(1, min(CHUNK, self.rate // 20)) if self.mode == "slow" else CHUNK

    def _reset_due(self, link: _Link, direction: Direction, size: int) -> bool:
        rule = self.rule
        return (
            self.mode == "reset"
            and direction == rule.direction
            and link.forwarded[direction] + size > rule.after
            and self._random.random() < rule.probability
        )

    def _room(self, link: _Link) -> int:
        return max(0, self.rule.after - link.forwarded[self.rule.direction])

    async def _pace(self, direction: Direction, size: int) -> None:
        """Token pacing per direction: a chunk leaves no earlier than the rate allows."""
        if self.mode != "slow" or self.rate <= 0:
            return
        now = time.monotonic()
        start = max(now, self._paced_until[direction])
        self._paced_until[direction] = start + size / self.rate
        await asyncio.sleep(self._paced_until[direction] - now)

    def _drop(self, link: _Link) -> None:
        """Reset both sides of `link` (RST, not FIN) and stop its pumps."""
        link.dropped = True
        for side in (link.client, link.upstream):
            if side is not None:
                _abort(side)
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()
        self._links.discard(link)

    async def _reset_all(self) -> None:
        links = list(self._links)
        for link in links:
            self._drop(link)
        tasks = [task for link in links for task in link.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()


def _reusable_socket() -> socket.socket:
    # SO_REUSEPORT lets the listener and the idle reserve socket share the port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER 0, then drop the transport without flushing."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@asynccontextmanager
async def proxied(receiver: WebhookReceiver) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of a running webhook `receiver`, passing traffic."""
    host, port = receiver.url.removeprefix("http://").rsplit(":", 1)
    async with FaultProxy(host, int(port)) as proxy:
        yield proxy


def received(receiver: WebhookReceiver, path: str = "/ingest") -> Counter[str]:
    """How often the receiver got each record id (a lost answer makes a repeat)."""
    bodies = (json.loads(d.body) for d in receiver.deliveries if d.path == path)
    return Counter(record["signal_id"]["$oid"] for body in bodies for record in body)


async def until(condition: Callable[[], Any], within: float = 30.0) -> Any:
    """Poll `condition` (in the event loop) until truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not (value := condition()):
        assert time.monotonic() < deadline, f"condition not met within {within}s"
        await asyncio.sleep(0.05)
    return value


# -- the process under test ---------------------------------------------------------------


@dataclass
class ProcessWatch:
    """Samples `pid`'s VmRSS and open fds every `interval` seconds; keeps the peaks."""

    pid: int
    interval: float = 0.1
    peak_rss_kib: int = 0
    peak_fds: int = 0
    samples: int = 0
    _task: asyncio.Task[None] | None = None

    def sample(self) -> tuple[int, int]:
        """One reading now: (VmRSS in KiB, open fds); the peaks are updated."""
        rss = 0
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_fds = max(self.peak_fds, fds)
        self.samples += 1
        return rss, fds

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_kib / 1024

    async def __aenter__(self) -> ProcessWatch:
        self.sample()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(OSError):  # the process may have just ended
                self.sample()
