"""POST → webhook receipt latency under a fixed, open-loop signal rate.

One load process (pinned to the load CPU) runs both ends: a rate-controlled aiohttp
client POSTing signals to the target, and an aiohttp webhook receiver that notes the
moment each record's id arrives. Latency per signal = receipt time - send time, on
one monotonic clock. The client is open-loop: requests leave on schedule whether or not
earlier ones were answered, so a slow server cannot slow the offered load (no
coordinated omission); the schedule lag (actual - planned send time) is reported so a
late generator would show.

    python -m bench.latency --target URL --port P --load 1000:1 --load 10000:10 \
        --seconds S --warmup W

`--load RATE:K` offers RATE signals/s as POSTs of K signals each (NDJSON when K > 1).
Prints one JSON object: per load, the latency percentiles of signals sent after the
warm-up, counts, and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from typing import Any

import aiohttp
import msgspec
import uvloop
from aiohttp import web

from bench.fixtures import Template, new_prefix, record_ids, template_text
from bench.procs import TOKEN

DRAIN_TIMEOUT = 15.0
REQUEST_TIMEOUT = 30.0  # a POST unanswered this long counts as failed (status 0)


class _Oid(msgspec.Struct):
    oid: str = msgspec.field(name="$oid")


class _Id(msgspec.Struct):
    signal_id: _Oid


_batch = msgspec.json.Decoder(list[_Id])


class Receiver:
    """The webhook end: receipt time of every record id, first arrival wins."""

    def __init__(self) -> None:
        self.received: dict[str, float] = {}
        self.requests = 0
        self.repeats = 0
        self.expected: set[str] = set()
        self.complete = asyncio.Event()

    def expect(self, ids: set[str]) -> None:
        """Set `complete` once every id in `ids` has arrived (at once if it already has)."""
        self.expected = ids - self.received.keys()
        if not self.expected:
            self.complete.set()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        self.requests += 1
        for record in _batch.decode(body):
            if record.signal_id.oid in self.received:
                self.repeats += 1
            else:
                self.received[record.signal_id.oid] = now
                self.expected.discard(record.signal_id.oid)
        if not self.expected:
            self.complete.set()
        return web.Response(status=200)


async def offer(
    session: aiohttp.ClientSession, url: str, rate: float, per_request: int, seconds: float
) -> tuple[dict[str, float], list[float], list[tuple[int, float]]]:
    """POST `rate` signals/s for `seconds`: (send time per id, schedule lags, (status,
    seconds to the answer) per request)."""
    template = Template(template_text(per_request))
    prefix, counter = new_prefix(), 0
    count = max(1, round(seconds * rate / per_request))
    bodies = []
    for _ in range(count):
        body, counter = template.render(prefix, counter)
        bodies.append(body)
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": "application/json" if per_request == 1 else "application/x-ndjson",
    }
    sent: dict[str, float] = {}
    lags: list[float] = []
    statuses: list[tuple[int, float]] = []
    tasks = set()
    interval = per_request / rate
    start = time.monotonic() + 0.05
    for index, body in enumerate(bodies):
        planned = start + index * interval
        delay = planned - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.monotonic()
        for record_id in record_ids(body):
            sent[record_id] = now
        lags.append(now - planned)
        task = asyncio.create_task(_post(session, url, body, headers, out=statuses, sent=now))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return sent, lags, statuses


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    out: list[tuple[int, float]],
    sent: float,
) -> None:
    try:
        async with session.post(url, data=body, headers=headers) as response:
            await response.read()
            out.append((response.status, time.monotonic() - sent))
    except (aiohttp.ClientError, TimeoutError):
        out.append((0, time.monotonic() - sent))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def run_load(
    session: aiohttp.ClientSession,
    receiver: Receiver,
    url: str,
    load: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    rate_text, _, per_text = load.partition(":")
    rate, per_request = float(rate_text), int(per_text or 1)
    began, wall_start = time.monotonic(), time.time()
    sent, lags, statuses = await offer(session, url, rate, per_request, args.warmup + args.seconds)
    receiver.complete.clear()
    receiver.expect(set(sent))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(receiver.complete.wait(), DRAIN_TIMEOUT)
    measured_from = began + 0.05 + args.warmup
    latencies = [
        (receiver.received[i] - t) * 1000
        for i, t in sent.items()
        if t >= measured_from and i in receiver.received
    ]
    lost = sum(1 for i in sent if i not in receiver.received)
    bad = sum(1 for status, _ in statuses if status != 202)
    acks = [seconds * 1000 for _, seconds in statuses]
    return {
        "load": load,
        "rate": rate,
        "per_request": per_request,
        "signals": len(sent),
        "measured": len(latencies),
        "lost": lost,
        "bad_status": bad,
        "p50_ms": percentile(latencies, 50) if latencies else None,
        "p90_ms": percentile(latencies, 90) if latencies else None,
        "p99_ms": percentile(latencies, 99) if latencies else None,
        "max_ms": max(latencies) if latencies else None,
        "lag_p99_ms": percentile(lags, 99) * 1000,
        "ack_p50_ms": percentile(acks, 50),
        "ack_p99_ms": percentile(acks, 99),
        "wall_start": wall_start,
        "wall_end": time.time(),
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    receiver = Receiver()
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, reuse_address=True).start()
    results = []
    try:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for load in args.load:
                result = await run_load(session, receiver, args.target, load, args)
                result["webhook_requests"] = receiver.requests
                result["repeats"] = receiver.repeats
                results.append(result)
    finally:
        await runner.cleanup()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--load", action="append", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print(json.dumps(runner.run(main_async(args))))


if __name__ == "__main__":
    main()
