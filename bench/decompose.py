"""Where the single-signal POST's time goes: the daemon with parts of its work removed.

The single-signal figure compares the daemon with a no-op handler. When it misses, the
harness also measures the steps in between, each a real `firehosed run` under the same
wrk load and pinning (daemon CPU 0, wrk CPU 1), alternating within every repetition:

- no-op: bench/noop_server.py, the ceiling (aiohttp's low-level server, as the daemon);
- no-op, Application: the same handler behind an aiohttp Application and its router (the
  usual way, and the ceiling until the daemon moved to the low-level server);
- no-op, durable: the same handler, but it answers only after appending the body to a
  file with a group-committed fdatasync (`--journal`): what durability alone costs an
  aiohttp handler on this machine, whatever else it does;
- no firehose: auth, body, envelope, dedupe and the 202; nothing is queued;
- firehose, no match: also routing (record encoding, framing, catch-up bookkeeping),
  but the firehose's `types` admits nothing, so nothing is appended or synced;
- firehose, memory: appended and group-committed without fsync (`durability = memory`);
- firehose, fsync: the real thing (`durability = fsync`).

Each step's signals/s and CPU per signal (all threads, /proc) show what each layer
costs; bench/perrecord.py then times the daemon's own steps per record, without HTTP.
Alone: `python -m bench.decompose` prints the table (the full run's settings).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from bench import perrecord
from bench.procs import Daemon, NoopServer, cpu_times, firehose_toml
from bench.report import Series
from bench.settings import Settings, full
from bench.throughput import SINGLE, load, template_for

FIREHOSE = firehose_toml("f1", format="ndjson")
STEPS = (
    "no-op",
    "no-op, Application",
    "no-op, durable",
    "no firehose",
    "firehose, no match",
    "firehose, memory",
    "firehose, fsync",
)


def table(settings: Settings) -> list[str]:
    """Markdown lines: each step's signals/s, ratio to the no-op handler, CPU per signal."""
    rates = {step: Series("signals/s") for step in STEPS}
    costs = {step: Series("µs") for step in STEPS}
    template = template_for(SINGLE, settings.work)
    for rep in range(settings.curve_reps):
        for step in STEPS if rep % 2 == 0 else STEPS[::-1]:
            rate, cost = _step(step, settings, template)
            rates[step].add(rate)
            costs[step].add(cost)
    noop = rates["no-op"].median
    durable = rates["no-op, durable"].median
    lines = [
        "Single-signal POST, decomposed (bench/decompose.py): the same load against the"
        " daemon with parts of its work taken away; each step adds one layer.",
        "",
        f"The durable no-op (the no-op handler plus a group-committed fdatasync before the"
        f" 202) reaches {durable / noop:.2f} x the no-op: what durability alone costs an"
        f" aiohttp handler here. The daemon reaches"
        f" {rates['firehose, fsync'].median / durable:.2f} x the durable no-op.",
        "",
        "| step | signals/s | ratio to no-op | CPU per signal, all threads |",
        "| --- | --- | --- | --- |",
    ]
    for step in STEPS:
        ratio = rates[step].median / noop
        lines.append(f"| {step} | {rates[step].text()} | {ratio:.2f} x | {costs[step].text()} |")
    records = 10_000 if settings.quick else 75_000  # 75k: about one 64 MiB batch
    return [*lines, "", perrecord.line(settings.work, records)]


def _config(text: str, step: str) -> str:
    """The bench config rewritten for `step`."""
    if step == "no firehose":
        return text.replace(FIREHOSE, "")
    if step == "firehose, no match":
        return text + 'types = ["no-such-type"]\n'
    if step == "firehose, memory":
        return text.replace('durability = "fsync"', 'durability = "memory"')
    return text


def _step(step: str, settings: Settings, template: Path) -> tuple[float, float]:
    if step.startswith("no-op"):
        journal = settings.work / "journal" if step == "no-op, durable" else None
        noop = NoopServer.start(journal=journal, app=step == "no-op, Application")
        try:
            return _run(noop.signals_url, settings, template, noop.proc.pid)
        finally:
            noop.stop()
            if journal:
                journal.unlink(missing_ok=True)
    root = settings.work / "decompose"
    daemon = Daemon(root, FIREHOSE)
    daemon.write_config(_config(daemon.config_path.read_text(), step))
    daemon.start()
    try:
        return _run(daemon.signals_url, settings, template, daemon.pid)
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def _run(url: str, settings: Settings, template: Path, pid: int) -> tuple[float, float]:
    """(signals/s, CPU µs per signal) of one measured wrk run after a warm-up."""
    load(url, SINGLE, template, settings.warmup)
    before = sum(cpu_times(pid))
    result = load(url, SINGLE, template, settings.measure)
    return result.rate, 1e6 * (sum(cpu_times(pid)) - before) / result.requests


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="firehosed-decompose-") as work:
        print("\n".join(table(full(Path(work), profile=False))))
