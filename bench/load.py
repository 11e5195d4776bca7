"""Loads with no daemon work behind them, set beside an import's: how much a POST's
latency suffers from the disk, or the CPUs, being as busy as the import kept them, with
nothing of firehosed's doing the work.

    .venv/bin/python -m bench.load disk DIRECTORY BYTES_PER_SECOND SECONDS
    .venv/bin/python -m bench.load cpu SHARE SECONDS

`disk` writes as a queue and its batch files do: files of FILE bytes in writes of BLOCK,
an fdatasync after each (a group commit), an fsync at each file's end, the file before
last deleted. `cpu` keeps one CPU busy for SHARE of every 10 ms (run one per CPU share).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

BLOCK = 1 << 20
FILE = 4 << 20
CYCLE = 0.01  # seconds


def disk(directory: Path, rate: float, seconds: float) -> None:
    """Write `rate` bytes a second into `directory` for `seconds`."""
    block = os.urandom(BLOCK)
    started = time.monotonic()
    written = number = 0
    while (now := time.monotonic()) - started < seconds:
        path = directory / f"load-{number}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(FILE // BLOCK):
                time.sleep(max(0.0, started + written / rate - now))
                os.write(fd, block)
                os.fdatasync(fd)
                written += BLOCK
                now = time.monotonic()
            os.fsync(fd)
        finally:
            os.close(fd)
        (directory / f"load-{number - 2}").unlink(missing_ok=True)
        number += 1
    for left in directory.glob("load-*"):
        left.unlink()


def cpu(share: float, seconds: float) -> None:
    """Keep a CPU busy `share` of each CYCLE for `seconds`."""
    ends = time.monotonic() + seconds
    while (now := time.monotonic()) < ends:
        busy_until = now + share * CYCLE
        while time.monotonic() < busy_until:
            pass
        time.sleep((1 - share) * CYCLE)


def main() -> int:
    kind, *args = sys.argv[1:]
    if kind == "disk":
        disk(Path(args[0]), float(args[1]), float(args[2]))
    elif kind == "cpu":
        cpu(float(args[0]), float(args[1]))
    else:
        raise SystemExit(f"unknown load {kind!r}: disk or cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
