"""Does the status page slow ingest? Single-signal POSTs (wrk) with and without 1000
status-page requests a second on the admin listener, alternating, same daemon config.

    .venv/bin/python -m bench.admin_load [--reps 3]

The page load is a paced aiohttp client on the load CPU beside wrk, as an operator's
browsers and scrapers would be on other machines; the daemon is on its own CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.procs import LOAD_CPU, Daemon, firehose_toml, pinned
from bench.settings import full
from bench.throughput import SINGLE, load, template_for

PAGE_RATE = 1000  # requests per second, from CLIENTS loops
CLIENTS = 8
SECONDS = 6.0


async def _pages(url: str, seconds: float) -> int:
    """GET `url` at PAGE_RATE for `seconds` (CLIENTS paced loops); how many got 200."""
    async with aiohttp.ClientSession() as session:
        counts = await asyncio.gather(*(_paced(session, url, seconds) for _ in range(CLIENTS)))
    return sum(counts)


async def _paced(session: aiohttp.ClientSession, url: str, seconds: float) -> int:
    done, sent, interval = 0, 0, CLIENTS / PAGE_RATE
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        async with session.get(url) as response:
            await response.read()
            done += response.status == 200
        sent += 1
        await asyncio.sleep(max(0.0, start + sent * interval - time.monotonic()))
    return done


def _page_load(url: str, seconds: float) -> subprocess.Popen[bytes]:
    code = (
        f"import asyncio, bench.admin_load as a; print(asyncio.run(a._pages({url!r}, {seconds})))"
    )
    argv = pinned(LOAD_CPU, [sys.executable, "-c", code])
    return subprocess.Popen(argv, stdout=subprocess.PIPE)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    reps = parser.parse_args().reps
    rates: dict[bool, list[float]] = {False: [], True: []}
    pages: list[int] = []
    with tempfile.TemporaryDirectory(prefix="firehosed-admin-load-") as work:
        settings = full(Path(work), profile=False)
        template = template_for(SINGLE, settings.work)
        daemon = Daemon(Path(work) / "d", firehose_toml("f1", format="ndjson"))
        daemon.start()
        try:
            page_url = f"http://127.0.0.1:{daemon.admin_port}/"
            load(daemon.signals_url, SINGLE, template, 2)  # warm-up
            for rep in range(reps):
                for with_pages in (False, True) if rep % 2 == 0 else (True, False):
                    loader = _page_load(page_url, SECONDS + 1) if with_pages else None
                    time.sleep(0.5)
                    result = load(daemon.signals_url, SINGLE, template, SECONDS)
                    rates[with_pages].append(result.rate)
                    if loader is not None:
                        out, _ = loader.communicate(timeout=60)
                        pages.append(int(out.strip() or 0))
        finally:
            daemon.stop()
    alone, loaded = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"ingest alone: {alone:,.0f} signals/s {[round(r) for r in rates[False]]}")
    with_list = [round(r) for r in rates[True]]
    print(f"ingest with {PAGE_RATE} pages/s: {loaded:,.0f} signals/s {with_list}")
    print(f"pages answered per run: {pages} (of ~{PAGE_RATE * (SECONDS + 1):.0f} asked)")
    print(f"ingest with pages / alone: {loaded / alone:.3f} (target ≥ 0.90)")


if __name__ == "__main__":
    main()
