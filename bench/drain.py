"""Backlog drain: a cold restart on 1 GB queued, delivered to SFTP (OpenSSH) or S3 (moto).

How fast a backlog leaves after an outage or a restart: nothing in the issue's table
sets a target for it, so `bench/run` does not run it; bench/RESULTS-drain.md records
what it measured and why.

    python -m bench.drain sftp|s3 [--reps N] [--unpinned]

The queue and its crashed snapshot are built as for the restart recovery figure
(`bench.recovery`); each repetition restarts a cold copy of it with a firehose of
64 MiB NDJSON files into the server, and prints one JSON line: seconds from the spawn to
/readyz, to the first and to the last `batch.delivered`, and the files delivered. The
daemon is pinned to CPU 0 and the server to CPU 1, as in `bench/run`, unless
`--unpinned` (the daemon then has both cores: its cut runs in a thread).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import recovery, settings
from bench.procs import SERVER_CPU, Daemon, event_time, firehose_toml, wait_until
from bench.servers import Moto, Sshd

BUCKET = "drain"
FILES = 15  # 1.08 GB of frames: fifteen 64 MiB NDJSON files, the last one partial


@contextmanager
def channel(kind: str, home: Path) -> Iterator[str]:
    """Start the server; yield the `[channels.out]` table that delivers to it."""
    if kind == "sftp":
        sshd = Sshd.start(home / "sshd")
        out = home / "sftp-out"
        out.mkdir()
        try:
            yield sshd.channel_toml("out", out)
        finally:
            sshd.stop()
        return
    moto = Moto.start()
    try:
        moto.create_bucket(BUCKET)
        yield moto.channel_toml("out", BUCKET)
    finally:
        moto.stop()


def restart(snapshot: Path, root: Path, table: str, unpinned: bool) -> dict[str, float]:
    """One cold restart on a copy of `snapshot`, until every file is delivered."""
    shutil.copytree(snapshot / "var", root / "var")
    recovery.evict(root / "var")
    tables = table + firehose_toml(
        recovery.FIREHOSE, channel="out", format="ndjson", minutes_between_files=0.01
    )
    daemon = Daemon(root, tables, cpu=None if unpinned else SERVER_CPU)
    try:
        daemon.start(wait=False)
        wait_until(daemon.ready, 300, "/readyz after restart", interval=0.005)
        wait_until(lambda: len(daemon.events("batch.delivered")) >= FILES, 900, "drain", 0.05)
        daemon.check_no_errors()
        delivered = daemon.events("batch.delivered")
        at = daemon.started_at
        return {
            "ready": event_time(daemon.events("daemon.ready")[0]) - at,
            "first": event_time(delivered[0]) - at,
            "last": event_time(delivered[-1]) - at,
            "files": len(delivered),
        }
    finally:
        daemon.kill()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("sftp", "s3"))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--unpinned", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="firehosed-drain-") as tmp:
        work = Path(tmp)
        snapshot, _, _ = recovery.build_snapshot(settings.full(work, profile=False))
        with channel(args.kind, work) as table:
            for rep in range(args.reps):
                result = restart(snapshot, work / f"restart-{rep}", table, args.unpinned)
                print(json.dumps({"rep": rep, **{k: round(v, 2) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
