"""What a hop to a worker thread and back costs on a busy event loop (uvloop, one core).

The daemon's group commit and batch cut each run in a thread (`asyncio.to_thread`). This
times the two hops of such a call: from the call to the thread running ("in"), and from
the thread's end to the awaiting coroutine running again ("out"), while another task
keeps the loop busy in chunks of BUSY_US microseconds between iterations, as requests do
under load. The thread sleeps 0.3 ms in place of a sync (GIL released, as in fdatasync).

    taskset -c 0 python -m bench.handoff [BUSY_US ...]

Prints p50 and p90 per hop, in µs, for each chunk size (default: 0, 50, 200).
"""

from __future__ import annotations

import asyncio
import sys
import time

import uvloop

from bench.latency import percentile

CALLS = 3000
SYNC = 0.0003  # seconds the thread holds no GIL, as a sync would


async def measure(busy: float) -> tuple[list[float], list[float]]:
    """(in, out) hop times in seconds of CALLS thread calls, the loop busy `busy` s a turn."""
    hops_in: list[float] = []
    hops_out: list[float] = []
    marks: dict[str, float] = {}

    def work() -> None:
        marks["in"] = time.perf_counter()
        time.sleep(SYNC)
        marks["out"] = time.perf_counter()

    async def other_work() -> None:
        while True:
            started = time.perf_counter()
            while time.perf_counter() - started < busy:
                pass
            await asyncio.sleep(0)

    load = asyncio.create_task(other_work()) if busy else None
    for _ in range(CALLS):
        called = time.perf_counter()
        await asyncio.to_thread(work)
        hops_in.append(marks["in"] - called)
        hops_out.append(time.perf_counter() - marks["out"])
    if load is not None:
        load.cancel()
    return hops_in, hops_out


def main(argv: list[str]) -> None:
    for busy_us in [float(a) for a in argv] or [0.0, 50.0, 200.0]:
        hops_in, hops_out = uvloop.run(measure(busy_us / 1e6))
        p50_in, p90_in = (1e6 * percentile(hops_in, q) for q in (50, 90))
        p50_out, p90_out = (1e6 * percentile(hops_out, q) for q in (50, 90))
        print(
            f"loop busy {busy_us:4.0f} µs a turn: in p50 {p50_in:4.0f} p90 {p90_in:4.0f}"
            f" | out p50 {p50_out:4.0f} p90 {p90_out:4.0f} µs"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
