"""Imports: a CSV of 1M rows pulled from a directory, SFTP and S3, end to end.

    .venv/bin/python -m bench.imports [--rows 1000000] [--sources directory,sftp,s3] [--repeat N]

Writes a CSV of `--rows` rows (about 300 B each, 1% of them bad) and the ceiling: Python's
`csv` reader over the same bytes, in memory. Then, per source, a fresh daemon whose config
gains a one-time import task by a reload. With `--import-processes 0` the daemon reads
the file in a thread, pinned to the server CPU; else (the default, 1) it reads it in a
child process and is not pinned, so that the child can take the other CPU (`--pin`:
pinned all the same). The run is timed from its fetch starting to its processing ending
(the rows durable in the firehose's queue), its peak RSS (the daemon's and its child's)
above the daemon's idle RSS sampled every 20 ms, and single-signal
POSTs (100/s from the load CPU) are timed before and during the import, so that the
import's cost to ingest shows as the p99 ratio, and the event loop's longest stall as
the slowest POST. Targets (issue 16): rows/s >= 0.3x the ceiling, peak RSS <= 100 MiB
above idle, POST p99 during the import <= 2x without.

Beside that ratio, two ceilings measured in the same run, the daemon idle but for the
POSTs (bench/load.py): the POSTs' p99 while a plain process writes the disk at the
import's rate (the daemon's bytes written a second), and while busy loops take the CPU
time the import took (the daemon's and its child's CPU seconds a second). A p99 ratio
near those is what the machine gives any load of that size, not the import's own cost.

S3 is moto, on this machine's load CPU: its fetch is bound by moto's CPU, which the
import's own work then shares. With `--s3-link 50MB` the daemon reaches it through a
proxy carrying that many bytes a second (bench/servers.py `Link`), as it would a real
S3 across a network, where a run reads the file's rows as it arrives (README, *From S3,
a file is read as it arrives*) while the fetch waits on the link.

Idle is the daemon's RSS after a first run from the same source (a one-row file): a
daemon with an import task keeps its source's client from its first run on (an S3 one
is about 15 MiB of botocore models), so that is what its idle holds once it has run.
The growth above the daemon as it started, before any run, is printed beside it.

With `--repeat N`, N rounds each measure the ceiling and then every source (a fresh
daemon and servers each time), and a summary gives each figure's median [min-max]: the
ratio is judged on its median, RSS on its largest. Beside the POSTs' figures, the group
commit's rounds (the daemon's `firehosed_fsync_seconds`) before and during the import:
how long a round a POST's answer waits for takes while the import writes.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.procs import (
    ACCOUNT,
    PYTHON,
    REPO,
    SERVER_CPU,
    TOKEN,
    Daemon,
    firehose_toml,
    tree_cpu_seconds,
    tree_rss_kib,
    write_bytes,
)
from bench.report import Series
from bench.servers import Link, Missing, Moto, Sshd
from firehosed.units import parse_size

HEADER = [
    "event",
    "event_id",
    "customer_id",
    "session_id",
    "timestamp",
    "sku",
    "name",
    "price",
    "url",
]
RATIO_TARGET, RSS_TARGET, P99_TARGET = 0.3, 100 << 20, 2.0
FILE = "4MiB"  # the firehose's files: the cut's own memory is its business, not the import's
POST_RATE = 100  # single-signal POSTs per second while measuring latency
QUIET = 3.0  # seconds of POSTs measured before the import starts
LOADED = 8.0  # seconds of POSTs measured under each of bench/load.py's loads
COMMITS = "firehosed_fsync_seconds"  # the group commit's write and fsync, a round each
WARM = "warm.csv"  # the one-row file of the first run
TASK = """
[imports.{name}]
account = "{account}"
source = "{source}"
pattern = "{pattern}"
format = "{fmt}"
once = true
{limit}
[imports.{name}.columns]
type = "event"
id = "event_id"
person = "customer_id"
session = "session_id"
time = "timestamp"
"""


def write_csv(path: Path, rows: int) -> int:
    """The benchmark's CSV: `rows` rows (about 300 B), 1% bad (no person or session);
    its bytes."""
    pick = random.Random(16)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\r\n")
        writer.writerow(HEADER)
        for n in range(rows):
            sku = pick.randrange(5000)
            writer.writerow(
                [
                    ("purchase", "add to cart", "view")[n % 3],
                    f"{n:024x}",
                    "" if n % 100 == 99 else f"customer-{pick.randrange(100_000):06d}@example.com",
                    "" if n % 100 == 99 else f"session-{n // 7:012x}",
                    f"2026-12-04T{n % 24:02d}:{n % 60:02d}:{n % 59:02d}.{n % 1000:03d}Z",
                    f"sku-{sku:05d}",
                    f"Catalogue product {sku} in graphite black, size {sku % 13}, with a long "
                    "name as catalogues write them, and a description of what it is for",
                    f"{pick.uniform(1, 500):.2f}",
                    f"https://shop.example/p/{sku:05d}?ref=mail&utm_campaign=cart-{n % 40}",
                ]
            )
    return path.stat().st_size


def ceiling(path: Path, runs: int = 3) -> tuple[float, int]:
    """Seconds for `csv.reader` to read the file's text from memory, the best of `runs`
    (the first pass is slow by half: its 1.3 GB buffer's pages are new); the rows."""
    text = path.read_bytes().decode("utf-8")
    best, rows = float("inf"), 0
    for _ in range(runs):
        started = time.perf_counter()
        rows = sum(1 for _ in csv.reader(io.StringIO(text, newline=""))) - 1
        best = min(best, time.perf_counter() - started)
    return best, rows


class Poster(threading.Thread):
    """Single-signal POSTs at POST_RATE from this process; latencies by phase."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.phase = "before"
        self.latencies: dict[str, list[float]] = {"before": [], "during": []}
        self.stopping = False

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        n = 0
        next_at = time.perf_counter()
        while not self.stopping:
            body = json.dumps(
                {"signal_id": {"$oid": f"f{n:023x}"}, "type": "pd", "did": f"live{n % 50}"}
            )
            started = time.perf_counter()
            conn.request("POST", f"/v1/accounts/{ACCOUNT}/signals", body, headers)
            response = conn.getresponse()
            response.read()
            if response.status == 202 and self.phase in self.latencies:
                self.latencies[self.phase].append(time.perf_counter() - started)
            n += 1
            next_at += 1 / POST_RATE
            time.sleep(max(0.0, next_at - time.perf_counter()))


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 100 else max(values)


def run_import(  # noqa: PLR0917 - one call, each argument named where it is made
    work: Path,
    source: str,
    channel: str,
    pattern: str,
    memory: str | None,
    rate: int | None,
    fmt: str = "csv",
    processes: int = 1,
    pin: bool = False,
    contention: bool = False,
) -> dict[str, Any]:
    """One daemon importing the file (in `fmt`) from `channel`: the run's figures. With
    `memory`, the account's dedupe and the catch-up rings are held to it (they grow with
    any million signals, imported or posted: this shows the import's own share). With
    `contention`, the POSTs are then timed under bench/load.py's loads."""
    limits: dict[str, Any] = {}
    if memory is not None:
        limits = {"catch_up_memory": memory, "account_keys": {"dedupe_max_memory": memory}}
    tables = channel + firehose_toml("all", format="ndjson", max_file=FILE)
    cpu = SERVER_CPU if pin or not processes else None
    daemon = Daemon(work / f"daemon-{source}", tables, cpu=cpu, **limits)
    text = daemon.config_path.read_text()
    daemon.write_config(text.replace("[server]\n", f"[server]\nimport_processes = {processes}\n"))
    daemon.start()
    poster = Poster(daemon.port)
    try:
        poster.phase = "warming"  # (not measured)
        poster.start()
        time.sleep(QUIET)
        cold = tree_rss_kib(daemon.pid) * 1024
        warm = TASK.format(
            name="warm", account=ACCOUNT, source=source, pattern=WARM, limit="", fmt="csv"
        )
        _add_task(daemon, warm)
        while finished(daemon, "warm") is None:
            time.sleep(0.05)
        poster.phase = "before"
        commits_quiet = buckets(daemon, COMMITS)
        time.sleep(QUIET)
        idle = tree_rss_kib(daemon.pid) * 1024
        lag_before = lags(daemon)
        commits_before = buckets(daemon, COMMITS)
        limit = f"rows_per_second = {rate}\n" if rate else ""
        task = TASK.format(
            name="bench", account=ACCOUNT, source=source, pattern=pattern, limit=limit, fmt=fmt
        )
        poster.phase = "during"
        cpu, written, clock = tree_cpu_seconds(daemon.pid), write_bytes(daemon.pid), time.time()
        _add_task(daemon, task)
        peak, document = idle, None
        while document is None:
            peak = max(peak, tree_rss_kib(daemon.pid) * 1024)
            document = finished(daemon, "bench")
            time.sleep(0.02)
        poster.phase = "after"
        clock = time.time() - clock
        cpu = (tree_cpu_seconds(daemon.pid) - cpu) / clock
        written = (write_bytes(daemon.pid) - written) / clock
        lag_after = lags(daemon)
        commits_after = buckets(daemon, COMMITS)
        loads = {"cpus": cpu, "bytes": written}
        if contention:
            loads |= _loaded(poster, daemon.root, cpu, written)
        daemon.check_no_errors()
    finally:
        poster.stopping = True
        poster.join(5)
        daemon.stop()
    started, ended = document["fetch"]["started"], document["processing"]["ended"]
    seconds = _epoch(ended) - _epoch(started)
    return {
        "document": document,
        "seconds": seconds,
        "rss_growth": peak - idle,
        "rss_growth_cold": peak - cold,
        "stalls": _minus(lag_after, lag_before),
        "commits_before": _minus(commits_before, commits_quiet),
        "commits": _minus(commits_after, commits_before),
        "before": poster.latencies["before"],
        "during": poster.latencies["during"],
        "loads": loads,
    }


def _loaded(poster: Poster, directory: Path, cpus: float, rate: float) -> dict[str, Any]:
    """The POSTs' latencies under bench/load.py's disk load at `rate` bytes a second, then
    under its CPU load of `cpus` CPUs, each for LOADED seconds."""
    found: dict[str, Any] = {}
    count = max(1, math.ceil(cpus))
    for phase, loads in (
        ("disk", [["disk", str(directory), str(rate), str(LOADED)]]),
        ("cpu", [["cpu", str(min(1.0, cpus / count)), str(LOADED)]] * count),
    ):
        poster.latencies[phase] = []
        poster.phase = phase
        procs = [subprocess.Popen([PYTHON, "-m", "bench.load", *args], cwd=REPO) for args in loads]
        for proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"bench.load {' '.join(loads[0])} failed")
        poster.phase = "after"
        found[phase] = poster.latencies[phase]
    return found


def _add_task(daemon: Daemon, task: str) -> None:
    """`task` added to the daemon's config, and a reload (SIGHUP): the task runs."""
    daemon.write_config(daemon.config_path.read_text() + task)
    if daemon.proc:
        daemon.proc.send_signal(1)


def lags(daemon: Daemon) -> dict[float, float]:
    """The loop-lag histogram's cumulative counts, by upper bound (seconds)."""
    return buckets(daemon, "firehosed_event_loop_lag_seconds")


def buckets(daemon: Daemon, histogram: str) -> dict[float, float]:
    """A histogram's cumulative counts, by upper bound (seconds)."""
    prefix = histogram + "_bucket{le="
    return {
        float(name[len(prefix) + 1 : -2]): value
        for name, value in daemon.metrics().items()
        if name.startswith(prefix) and "+Inf" not in name
    }


def _minus(later: dict[float, float], earlier: dict[float, float]) -> dict[float, float]:
    return {le: later[le] - earlier.get(le, 0) for le in later}


def shares(counts: dict[float, float]) -> str:
    """Cumulative histogram counts as the share of observations under each bound."""
    total = max(counts.values(), default=0)
    if not total:
        return "none"
    under = (f"<= {b * 1e3:g} ms {counts[b] / total:.0%}" for b in sorted(counts) if b <= 0.05)
    return f"{total:,.0f} rounds; " + ", ".join(under)


def worst_lag(stalls: dict[float, float]) -> str:
    """The loop's worst lag during the import, as the bucket that holds it."""
    bounds = sorted(stalls)
    total = max(stalls.values(), default=0)
    for bound in bounds:
        if stalls[bound] >= total:
            return f"<= {bound * 1e3:.0f} ms"
    return f"> {bounds[-1] * 1e3:.0f} ms"


def finished(daemon: Daemon, name: str) -> dict[str, Any] | None:
    """Task `name`'s run once it ended, else None."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.admin_port, timeout=10)
    conn.request("GET", "/v1/status")
    status = json.loads(conn.getresponse().read())
    task = status.get("imports", {}).get(name)
    if not task or not task["runs"]:
        return None
    run: dict[str, Any] = task["runs"][0]
    if run["fetch"]["status"] == "failed":
        raise RuntimeError(f"fetch failed: {run['fetch']}")
    return run if run["processing"]["status"] in ("processed", "failed") else None


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--sources", default="directory,sftp,s3")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds (each measures the ceiling, then every source): medians [min-max]",
    )
    parser.add_argument(
        "--rows-per-second", type=int, help="the task's rows_per_second (default: no limit)"
    )
    parser.add_argument(
        "--pipeline-memory",
        help='hold dedupe and catch-up memory to this ("16MiB"): the import\'s own RSS',
    )
    parser.add_argument(
        "--import-processes",
        type=int,
        default=1,
        help="the daemon's server.import_processes (0: the file is read in a thread)",
    )
    parser.add_argument(
        "--pin", action="store_true", help="pin the daemon to the server CPU even with a child"
    )
    parser.add_argument(
        "--s3-link",
        type=lambda text: int(parse_size(text)),
        help='S3 across a link of this many bytes a second ("50MB"): the fetch waits on '
        "the network, as from a real S3, rather than on this machine's CPUs (moto's here)",
    )
    parser.add_argument(
        "--no-contention",
        action="store_true",
        help="skip timing the POSTs under plain disk and CPU loads of the import's size",
    )
    args = parser.parse_args()
    print(
        f"server.import_processes = {args.import_processes}; the daemon "
        + ("pinned to CPU " + SERVER_CPU if args.pin or not args.import_processes else "not pinned")
    )
    sources = args.sources.split(",")
    summary: dict[str, dict[str, Series]] = {}
    with tempfile.TemporaryDirectory(prefix="firehosed-imports-") as tmp:
        work = Path(tmp)
        inbox = work / "inbox"
        inbox.mkdir()
        csv_path = inbox / "users-2026-12-04.csv"
        size = write_csv(csv_path, args.rows)
        for round_ in range(1, args.repeat + 1):
            ceiling_seconds, rows = ceiling(csv_path)
            ceiling_rate = rows / ceiling_seconds
            if args.repeat > 1:
                print(f"\n## round {round_} of {args.repeat}")
            print(f"file: {rows:,} rows, {size / 1e6:,.0f} MB ({size / rows:.0f} B a row), 1% bad")
            print(
                f"ceiling (csv.reader over the same bytes, in memory): {ceiling_rate:,.0f} rows/s"
            )
            rounds = work / f"round-{round_}"  # a fresh daemon state and servers each round
            rounds.mkdir()
            for source in sources:
                figures = measure_source(
                    rounds,
                    source,
                    csv_path,
                    args.pipeline_memory,
                    args.rows_per_second,
                    processes=args.import_processes,
                    pin=args.pin,
                    contention=not args.no_contention,
                    link=args.s3_link,
                )
                if figures is not None:
                    found = report(source, figures, ceiling_rate)
                    series = summary.setdefault(source, {k: Series(u) for k, u in UNITS.items()})
                    for key, value in found.items():
                        series[key].add(value)
    if args.repeat > 1:
        print(f"\n## {args.repeat} rounds: median [min-max]")
        for source, series in summary.items():
            print(
                f"\n{source}: {series['rate'].text()}, {series['ratio'].text(3)} the ceiling "
                f"(target >= {RATIO_TARGET}): {_v(series['ratio'].median >= RATIO_TARGET)}\n"
                f"  peak RSS above idle: {series['rss'].text(1)} (target <= 100): "
                f"{_v(max(series['rss'].values) <= RSS_TARGET >> 20)} (the largest judged)\n"
                f"  POST p99 during: {series['p99'].text(1)}, {series['p99_ratio'].text(2)} "
                f"(target <= {P99_TARGET}): {_v(series['p99_ratio'].median <= P99_TARGET)}"
            )
            for key, what in (("p99_disk", "disk load"), ("p99_cpu", "CPU load")):
                if series[key].values:
                    print(f"  POST p99 ratio under the {what} alone: {series[key].text(2)}")
    return 0


UNITS = {
    "rate": "rows/s",
    "ratio": "x",
    "rss": "MiB",
    "p99": "ms",
    "p99_ratio": "x",
    "p99_disk": "x",
    "p99_cpu": "x",
}


def report(source: str, f: dict[str, Any], ceiling_rate: float) -> dict[str, float]:
    """Print one run's figures; the figures the summary takes (UNITS' keys)."""
    processing = f["document"]["processing"]
    rate = processing["rows"] / f["seconds"]
    ratio = rate / ceiling_rate
    before, during = f["before"], f["during"]
    p99_ratio = p99(during) / p99(before)
    fetch = f["document"]["fetch"]
    fetching = _epoch(fetch["ended"]) - _epoch(fetch["started"])
    working = _epoch(processing["ended"]) - _epoch(processing["started"])
    print(
        f"\n{source}: {processing['rows']:,} rows in {f['seconds']:.1f} s "
        f"(fetch {fetching:.1f} s, processing {working:.1f} s), {rate:,.0f} rows/s; "
        f"{processing['imported']:,} imported, {processing['errored']:,} errored"
    )
    verdict = _v(ratio >= RATIO_TARGET)
    print(f"  ratio: {ratio:.2f} x the ceiling (target >= {RATIO_TARGET}): {verdict}")
    growth = f["rss_growth"]
    print(
        f"  peak RSS above idle: {growth / 2**20:.1f} MiB (target <= 100): "
        f"{_v(growth <= RSS_TARGET)}; above the daemon before its first run: "
        f"{f['rss_growth_cold'] / 2**20:.1f} MiB"
    )
    print(
        f"  POST p99: {p99(before) * 1e3:.1f} ms before, {p99(during) * 1e3:.1f} ms "
        f"during ({p99_ratio:.2f}x, target <= {P99_TARGET}): "
        f"{_v(p99_ratio <= P99_TARGET)}; slowest POST during: "
        f"{max(during) * 1e3:.0f} ms ({len(during)} POSTs)"
    )
    found = {
        "rate": rate,
        "ratio": ratio,
        "rss": growth / 2**20,
        "p99": p99(during) * 1e3,
        "p99_ratio": p99_ratio,
    }
    loads = f["loads"]
    for phase, what in (
        ("disk", f"the disk written at the import's {loads['bytes'] / 1e6:.0f} MB/s"),
        ("cpu", f"the CPUs busy for the import's {loads['cpus']:.2f} CPUs"),
    ):
        if phase in loads:
            found[f"p99_{phase}"] = p99(loads[phase]) / p99(before)
            print(
                f"  POST p99 with no import but {what} (bench/load.py): "
                f"{p99(loads[phase]) * 1e3:.1f} ms ({found[f'p99_{phase}']:.2f}x)"
            )
    print(f"  event loop's worst lag during the import: {worst_lag(f['stalls'])}")
    print(
        f"  group commits (write and fsync), before: {shares(f['commits_before'])}; "
        f"during the import: {shares(f['commits'])}"
    )
    return found


def _v(ok: bool) -> str:
    return "pass" if ok else "miss"


def measure_source(  # noqa: PLR0917 - as run_import
    work: Path,
    source: str,
    path: Path,
    memory: str | None,
    rate: int | None,
    fmt: str = "csv",
    processes: int = 1,
    pin: bool = False,
    contention: bool = False,
    link: int | None = None,
) -> dict[str, Any] | None:
    """run_import of the file at `path` served by `source`; None (said) when the
    source's server is not installed here."""
    try:
        channel, cleanup = _source(work, source, path, link)
    except Missing as exc:
        print(f"{source}: not measured ({exc})")
        return None
    try:
        return run_import(
            work,
            source,
            channel,
            path.name,
            memory,
            rate,
            fmt=fmt,
            processes=processes,
            pin=pin,
            contention=contention,
        )
    finally:
        cleanup()


def _source(work: Path, source: str, csv_path: Path, link: int | None) -> tuple[str, Any]:
    """A `[channels.NAME]` table serving the CSV from `source`, and its cleanup; S3
    reached over a `Link` of `link` bytes a second, if given."""
    warm = f"{','.join(HEADER)}\r\nview,warm,c@example.com,s,2026-12-04T00:00:00Z"
    warm += ",sku-00001,Thing,1.00,https://shop.example/p/00001\r\n"
    if source != "s3":
        (csv_path.parent / WARM).write_text(warm)
    if source == "directory":
        table = f'\n[channels.directory]\ntype = "directory"\npath = "{csv_path.parent}"\n'
        return table, lambda: None
    if source == "sftp":
        sshd = Sshd.start(work / "sshd")
        return sshd.channel_toml("sftp", csv_path.parent), sshd.stop
    if source == "s3":
        moto = Moto.start()
        moto.create_bucket("bench", {csv_path.name: csv_path.read_bytes(), WARM: warm.encode()})
        if link is None:
            return moto.channel_toml("s3", "bench"), moto.stop
        slowed = Link(moto.url, link)

        def stop() -> None:
            slowed.stop()
            moto.stop()

        return moto.channel_toml("s3", "bench", slowed.url), stop
    raise SystemExit(f"unknown source {source!r}: directory, sftp or s3")


if __name__ == "__main__":
    sys.exit(main())
