"""Catch-up memory: what the rings of N sessions x 5 anonymous signals cost in RSS.

    python -m bench.memory SESSIONS [SIGNALS_PER_SESSION]

Feeds `firehosed.catchup.CatchUp` (max_memory lifted) through firehosed's own ingest
path minus HTTP: the account's `EnvelopeReader.read(raw)`, then `Routing.route(...)`,
which builds and encodes the Record and buffers it in the session's ring exactly as the
daemon does. The account has one firehose with `catch_up = true` and
`include_anonymous = false`, so nothing is staged in a queue and the rings are the only
memory that stays. Signals arrive interleaved across sessions (round r of every session,
then round r+1), as concurrent visitors would send them. Each raw signal is a distinct
~820-byte anonymous cart-abandon object (fresh id, its own session).

Prints JSON: RSS before and after (after gc), the raw signal bytes buffered, the
daemon's own estimate (`CatchUp.memory`), and the time per buffered signal. `figure()`
runs it (pinned) and judges it against 1.2 x raw + 150 B per session.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.fixtures import SIGNALS_PER_SESSION, Template, new_prefix, template_text
from bench.inprocess import Ingest
from bench.procs import PYTHON, REPO, SERVER_CPU, pinned
from bench.report import Figure, Series
from bench.settings import Settings
from firehosed.config import CatchUpConfig
from firehosed.queue.store import SegmentStore
from firehosed.units import Duration, Size


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def feed(sessions: int, per_session: int) -> dict[str, float]:
    template = Template(template_text(1, anonymous_share=1.0))
    prefix = new_prefix()
    config = CatchUpConfig(
        signals_per_session=30, session_ttl=Duration(86400.0), max_memory=Size(1 << 50)
    )
    # Never opened: with include_anonymous off, the router stages nothing in it.
    queue = SegmentStore(Path("/nonexistent"), "rings", 64 << 20, sync=True)
    ingest = Ingest([("rings", queue, {"catch_up": True, "include_anonymous": False})], config)
    catch_up = ingest.catch_up
    gc.collect()
    before = rss_bytes()
    raw_bytes = 0
    started = time.perf_counter()
    now = time.time()
    for round_ in range(per_session):
        for session_no in range(sessions):
            counter = session_no * SIGNALS_PER_SESSION + round_
            raw, _ = template.render(prefix, counter)
            ingest.accept(raw, now)
            raw_bytes += len(raw)
        now += 0.001
    elapsed = time.perf_counter() - started
    gc.collect()
    after = rss_bytes()
    if len(catch_up) != sessions:
        raise RuntimeError(f"expected {sessions} sessions in the rings, found {len(catch_up)}")
    return {
        "sessions": sessions,
        "signals": sessions * per_session,
        "raw_bytes": raw_bytes,
        "rss_before": before,
        "rss_after": after,
        "rss_delta": after - before,
        "daemon_estimate": catch_up.memory,
        "us_per_signal": elapsed / (sessions * per_session) * 1e6,
    }


def figure(settings: Settings) -> Figure:
    """Catch-up rings of N sessions x 5 anonymous signals vs 1.2 x raw + 150 B/session."""
    measured, budget, per_signal, estimate = Series("MB"), Series("MB"), Series("µs"), Series("MB")
    argv = pinned(SERVER_CPU, [PYTHON, "-m", "bench.memory", str(settings.memory_sessions)])
    ratio = Series("x")
    for _ in range(settings.memory_reps):
        done = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, check=False, timeout=7200
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        allowed = 1.2 * result["raw_bytes"] + 150 * result["sessions"]
        measured.add(result["rss_delta"] / 1e6)
        budget.add(allowed / 1e6)
        ratio.add(result["rss_delta"] / allowed)
        per_signal.add(result["us_per_signal"])
        estimate.add(result["daemon_estimate"] / 1e6)
        raw_mb = result["raw_bytes"] / 1e6
    sessions = settings.memory_sessions
    figure = Figure(
        title=f"catch-up memory, {sessions:,} sessions x 5 signals (max_memory lifted)",
        target="≤ 1.2 x raw + 150 B/session",
        result=measured,
        ceiling=budget,
        ceiling_label="budget 1.2 x raw + 150 B x sessions",
        ratio=ratio,
        passed=ratio.median <= 1.0,
        commands=[" ".join(argv)],
    )
    per = (measured.median * 1e6 - raw_mb * 1e6) / sessions
    figure.notes += [
        f"Raw signal bytes buffered: {raw_mb:,.0f} MB ({sessions * 5:,} distinct ~820-byte "
        f"anonymous signals); RSS growth {measured.median / raw_mb:.2f} x raw, i.e. "
        f"{per:,.0f} B per session above the raw bytes.",
        f"firehosed's own estimate (`CatchUp.memory`, what max_memory is compared to): "
        f"{estimate.text()}.",
        f"Time per buffered signal (render + `EnvelopeReader.read` + `Routing.route`): "
        f"{per_signal.text()}.",
        "Measured in-process (`python -m bench.memory`): RSS after gc minus RSS before "
        "feeding; ratio = RSS growth ÷ budget.",
    ]
    return figure


def main() -> None:
    sessions = int(sys.argv[1])
    per_session = int(sys.argv[2]) if len(sys.argv) > 2 else SIGNALS_PER_SESSION
    print(json.dumps(feed(sessions, per_session)))


if __name__ == "__main__":
    main()
