"""In-process ceilings, each run as its own process pinned to the server CPU.

    python -m bench.ceilings decode TEMPLATE SECONDS   msgspec full-Struct decode, records/s
    python -m bench.ceilings fsync DIR SECONDS         fdatasync of 900-byte appends, per s
    python -m bench.ceilings write DIR SECONDS         4 MiB appends + fdatasync, MB/s

Each prints one JSON line. `decode` decodes the same NDJSON batches the daemon is sent
(rendered from the same template, distinct ids) into `fixtures.Signal`; `fsync` appends
to a file in the storage directory's file system and fdatasyncs after every append, the
cost one group commit pays; `write` appends 4 MiB chunks with an fdatasync after each,
the disk bandwidth a busy queue (or a batch file) can have.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.fixtures import Template, new_prefix, signal_decoder
from bench.procs import PYTHON, REPO, SERVER_CPU, pinned

APPEND_BYTES = 900


def decode_rate(template_path: str, seconds: float) -> dict[str, float]:
    """Records per second decoded into the full Signal Struct (NDJSON, decode_lines)."""
    template = Template(Path(template_path).read_text())
    prefix = new_prefix()
    bodies = []
    counter = 0
    for _ in range(8):
        body, counter = template.render(prefix, counter)
        bodies.append(body)
    decode = signal_decoder.decode_lines if template.records > 1 else signal_decoder.decode
    for body in bodies:  # warm-up
        decode(body)
    records = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for body in bodies:
            decode(body)
        records += template.records * len(bodies)
    return {"records_per_s": records / elapsed, "seconds": elapsed}


def fsync_rate(directory: str, seconds: float) -> dict[str, float]:
    """fdatasync calls per second, each after a small append to the same file."""
    path = Path(directory) / "fsync-probe.seg"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    chunk = b"x" * APPEND_BYTES
    syncs = 0
    try:
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            os.write(fd, chunk)
            os.fdatasync(fd)
            syncs += 1
    finally:
        os.close(fd)
        path.unlink()
    return {"fsyncs_per_s": syncs / elapsed, "seconds": elapsed}


def write_rate(directory: str, seconds: float) -> dict[str, float]:
    """MB/s of 4 MiB appends, each made durable (fdatasync) before the next."""
    path = Path(directory) / "write-probe.seg"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    chunk = os.urandom(4 << 20)
    written = 0
    try:
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            os.write(fd, chunk)
            os.fdatasync(fd)
            written += len(chunk)
    finally:
        os.close(fd)
        path.unlink()
    return {"mb_per_s": written / elapsed / 1e6, "seconds": elapsed}


def run_pinned(*args: str) -> tuple[dict[str, Any], str]:
    """Run this module with `args` on SERVER_CPU; (its JSON result, the command)."""
    argv = pinned(SERVER_CPU, [PYTHON, "-m", "bench.ceilings", *args])
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result, " ".join(argv)


def main() -> None:
    kind, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    run = {"decode": decode_rate, "fsync": fsync_rate, "write": write_rate}[kind]
    print(json.dumps(run(target, seconds)))


if __name__ == "__main__":
    main()
