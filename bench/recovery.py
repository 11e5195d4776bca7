"""Restart recovery with a large queue, and idle memory after start.

Restart recovery: a queue of `recovery_bytes` is written with firehosed's own
`SegmentStore` (the records a router would stage: identified cart-abandon signals, one
CRC-framed block per 1000-signal request, 64 MiB segments), then a real daemon starts on it with
the firehose paused, takes one more POST, and is killed with SIGKILL: that crashed
storage dir is the snapshot. Each repetition copies the snapshot, evicts the copy from
the page cache (fdatasync + POSIX_FADV_DONTNEED on every file: a cold start, as after a
reboot), starts `firehosed run` with the firehose unpaused (directory channel, fsync on),
and times, from the spawn: /readyz answering 200 (polled every 5 ms), and the first
`batch.delivered` log event. The ceiling is a process that starts Python, reads the
same cold queue files and CRC-32s them: the I/O and checksum any recovery must do.

    python -m bench.recovery build STORAGE_DIR FIREHOSE BYTES    (writes the queue)
    python -m bench.recovery read STORAGE_DIR                     (the ceiling)
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

from bench import fixtures
from bench.inprocess import Ingest
from bench.procs import (
    ACCOUNT,
    PYTHON,
    REPO,
    SERVER_CPU,
    TOKEN,
    Daemon,
    NoopServer,
    event_time,
    firehose_toml,
    free_port,
    http_get,
    pinned,
    rss_kib,
    terminate,
    wait_until,
)
from bench.report import Figure, Series, ratios
from bench.settings import Settings
from firehosed.fileio import fsync_path
from firehosed.queue.store import SegmentStore

FIREHOSE = "f1"
SEGMENT_SIZE = 64 << 20
WRITE_CHUNK = 8 << 20


# -- building the queue (subprocess) ------------------------------------------------------


def build(storage: Path, firehose: str, size: int) -> dict[str, float]:
    """Stage `size` bytes of records in `firehose`'s queue under `storage`, durably.

    Records go through firehosed's envelope reader and router (identified cart-abandon
    signals), then the queue's own `write`, as the group committer would (unsynced while
    writing, every segment fdatasynced at the end).
    """
    queue = SegmentStore(storage / "queues" / firehose, firehose, SEGMENT_SIZE, sync=True)
    queue.open()
    ingest = Ingest([(firehose, queue, {})])
    template = fixtures.Template(fixtures.template_text(1000))
    prefix, counter = fixtures.new_prefix(), 0
    written = records = 0
    started = time.perf_counter()
    while written < size:
        body, counter = template.render(prefix, counter)
        now = time.time()
        lines = body.splitlines()
        ingest.accept_all(lines, now)  # one request's block, as the daemon stages it
        records += len(lines)
        if queue.pending.size >= WRITE_CHUNK:
            written += queue.pending.size
            queue.write(queue.take_pending(), sync=False)
    queue.write(queue.take_pending(), sync=False)
    queue.close()
    for path in (storage / "queues" / firehose / "segments").iterdir():
        fsync_path(path)
    return {"bytes": written, "records": records, "seconds": time.perf_counter() - started}


def evict(root: Path) -> None:
    """Write back and drop every file under `root` from the page cache (cold start)."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_all(storage: Path) -> dict[str, float]:
    """The ceiling: read every queue file and CRC-32 it (run right after `evict`)."""
    total = 0
    for path in sorted((storage / "queues").rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(8 << 20):
                    zlib.crc32(chunk)
                    total += len(chunk)
    return {"bytes": total}


def _run(*args: str) -> dict[str, float]:
    argv = pinned(SERVER_CPU, [PYTHON, "-m", "bench.recovery", *args])
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- the figure ---------------------------------------------------------------------------


def _tables(paused: bool) -> str:
    # A file is due 0.6 s after its first record, so a queue smaller than max_file (the
    # quick run's) is cut at once too; a larger one is cut at max_file (64 MiB) anyway.
    return firehose_toml(FIREHOSE, format="ndjson", paused=paused, minutes_between_files=0.01)


def build_snapshot(settings: Settings) -> tuple[Path, dict[str, float], float]:
    """Build the queue, crash a daemon on it; (the snapshot root, build facts, queue bytes)."""
    root = settings.work / "recovery-snapshot"
    built = _run("build", str(root / "var"), FIREHOSE, str(settings.recovery_bytes))
    daemon = Daemon(root, _tables(paused=True)).start(timeout=300)
    body, _ = fixtures.Template(fixtures.template_text(1000)).render(fixtures.new_prefix(), 0)
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"}
    conn.request("POST", f"/v1/accounts/{ACCOUNT}/signals", body, headers)
    status = conn.getresponse().status
    conn.close()
    figures = json.loads(http_get(daemon.admin_port, "/v1/status")[1])["firehoses"][FIREHOSE]
    daemon.kill()
    if status != 202:
        raise RuntimeError(f"recovery: POST before the crash answered {status}")
    if figures["queued_records"] < built["records"] + 1000:
        # The daemon must see every record the builder staged (else the format drifted).
        raise RuntimeError(
            f"recovery: built {built['records']:.0f} records (+1000 posted), the daemon "
            f"recovered {figures['queued_records']}:\n{daemon.log_tail()}"
        )
    return root, built, float(figures["queued_bytes"])


def _restart(settings: Settings, snapshot: Path, rep: int) -> tuple[float, float, float, str]:
    """One cold restart: (s to /readyz 200, s to first delivery, daemon's own ready s, argv)."""
    root = settings.work / f"recovery-{rep}"
    shutil.copytree(snapshot / "var", root / "var")
    evict(root / "var")
    daemon = Daemon(root, _tables(paused=False))
    try:
        daemon.start(wait=False)
        spawned = time.monotonic()
        wait_until(daemon.ready, 300, "/readyz after restart", interval=0.005)
        ready = time.monotonic() - spawned
        delivered = wait_until(
            lambda: daemon.events("batch.delivered"), 300, "first delivery", 0.02
        )
        first = event_time(delivered[0]) - daemon.started_at
        own = float(daemon.events("daemon.ready")[0]["seconds"])
        daemon.check_no_errors()
        return ready, first, own, " ".join(daemon.argv)
    finally:
        daemon.kill()
        shutil.rmtree(root, ignore_errors=True)


def _ceiling(snapshot: Path) -> tuple[float, str]:
    evict(snapshot / "var")
    started = time.monotonic()
    _run("read", str(snapshot / "var"))
    argv = pinned(SERVER_CPU, [PYTHON, "-m", "bench.recovery", "read", str(snapshot / "var")])
    return time.monotonic() - started, " ".join(argv)


def recovery_figure(settings: Settings) -> list[Figure]:
    snapshot, built, queued = build_snapshot(settings)
    ready, first, own, floor = Series("s"), Series("s"), Series("s"), Series("s")
    commands = [
        " ".join(
            pinned(
                SERVER_CPU,
                [
                    PYTHON,
                    "-m",
                    "bench.recovery",
                    "build",
                    "$WORK/var",
                    FIREHOSE,
                    str(settings.recovery_bytes),
                ],
            )
        )
    ]
    try:
        for rep in range(settings.recovery_reps):
            seconds, command = _ceiling(snapshot)
            floor.add(seconds)
            r, f, o, argv = _restart(settings, snapshot, rep)
            ready.add(r)
            first.add(f)
            own.add(o)
            commands += [command, argv]
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)
    size = f"{queued / 1e9:.2f} GB" if queued >= 1e9 else f"{queued / 1e6:.0f} MB"
    ready_fig = Figure(
        title=f"restart recovery: {size} queued, kill -9 → /readyz 200",
        target="ready ≤ 5 s",
        result=ready,
        ceiling=floor,
        ceiling_label="cold read + CRC of the queue files",
        ratio=ratios(ready, floor, inverse=True),
        passed=ready.median <= 5.0,
        commands=commands,
    )
    ready_fig.notes += [
        f"Queue built by firehosed's SegmentStore: {built['records']:,.0f} records, "
        f"{built['bytes'] / 1e6:,.0f} MB of frames; then a daemon (firehose paused) started "
        "on it, took one more POST of 1000 signals and was killed with SIGKILL.",
        "Each repetition restarts a copy of that crashed storage dir with the page cache "
        "dropped for it (cold), firehose unpaused, directory channel with fsync.",
        f"The daemon's own `daemon.ready seconds` (recovery inside the process, without "
        f"interpreter start and imports): {own.text()}.",
        "Ratio = ceiling time ÷ daemon time.",
    ]
    first_fig = Figure(
        title=f"restart recovery: {size} queued → first delivery",
        target="— (reported)",
        result=first,
        notes=[
            "From the spawn to the first `batch.delivered` event (an NDJSON file of up "
            "to max_file, 64 MiB, into the directory channel, fsync)."
        ],
    )
    return [ready_fig, first_fig]


# -- idle memory --------------------------------------------------------------------------


def _idle_rss(settings: Settings, rep: int) -> tuple[float, str]:
    """(MB resident 2 s after ready, argv) of `firehosed run` with the shipped config."""
    root = settings.work / f"idle-{rep}"
    root.mkdir(parents=True)
    port = free_port()
    shipped = (REPO / "config.toml").read_text()
    text, count = re.subn(r'(?m)^listen = "[^"]*8080"', f'listen = "127.0.0.1:{port}"', shipped)
    # [admin] listen too: runs side by side must not share its default port.
    admin = f'listen = "127.0.0.1:{free_port()}"'
    text, admin_count = re.subn(r'(?m)^listen = "[^"]*8081"', admin, text)
    if (count, admin_count) != (1, 1):
        raise RuntimeError("config.toml: expected one server and one admin `listen = ...` line")
    (root / "config.toml").write_text(text)
    argv = pinned(SERVER_CPU, [PYTHON, "-m", "firehosed", "run", "-c", str(root / "config.toml")])
    with open(root / "daemon.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=root, stdout=log, stderr=log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"firehosed exited: {(root / 'daemon.log').read_text()[-2000:]}")
        return http_get(port, "/readyz")[0] == 200

    try:
        wait_until(ready, 60, "firehosed /readyz")
        time.sleep(2.0)
        return rss_kib(proc.pid) * 1024 / 1e6, " ".join(argv)
    finally:
        terminate(proc)
        shutil.rmtree(root, ignore_errors=True)


def _noop_rss() -> tuple[float, str]:
    noop = NoopServer.start()
    try:
        time.sleep(2.0)
        return rss_kib(noop.proc.pid) * 1024 / 1e6, " ".join(noop.argv)
    finally:
        noop.stop()


def idle_figure(settings: Settings) -> Figure:
    """RSS of `firehosed run` with the shipped config.toml, 2 s after ready."""
    rss, floor = Series("MB"), Series("MB")
    commands = []
    for rep in range(settings.idle_reps):
        mb, argv = _idle_rss(settings, rep)
        rss.add(mb)
        mb, noop_argv = _noop_rss()
        floor.add(mb)
        commands += [argv + "   # cwd = a temp dir; listen = a free port", noop_argv]
    figure = Figure(
        title="idle RSS after start (shipped config.toml)",
        target="≤ 60 MB",
        result=rss,
        ceiling=floor,
        ceiling_label="no-op aiohttp+uvloop+msgspec server",
        ratio=ratios(rss, floor),
        passed=rss.median <= 60.0,
        commands=commands,
    )
    figure.notes.append(
        "The shipped config.toml with only `listen` changed (to a free port), run in a "
        "temp dir (so ./var is fresh); VmRSS 2 s after /readyz. Ratio = daemon ÷ floor."
    )
    return figure


def main() -> None:
    command, storage = sys.argv[1], Path(sys.argv[2])
    if command == "build":
        result = build(storage, sys.argv[3], int(sys.argv[4]))
    else:
        result = read_all(storage)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
