"""Disk full (a real, small tmpfs as storage.dir) and failing fsync: no 202 without durable
data, 503 with Retry-After, no acknowledged signal lost, recovery when space returns."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon, signal_record, wait_until
from tests.faults.report import report

PAUSED = """
[firehoses.files]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.01
paused = {paused}
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: the daemon's whole directory (storage, export, log) lives on it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {done.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def grow(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)


def test_disk_full_answers_503_and_recovers_when_space_returns(small_disk: Path) -> None:
    daemon = Daemon(small_disk, PAUSED.format(paused="true"))
    try:
        daemon.start()
        acked: set[str] = set()
        refusals = []
        n = 0
        while len(refusals) < 3 and n < 20_000:
            batch = [signal_record(i, note="x" * 900) for i in range(n, n + 50)]
            n += 50
            response = daemon.post(batch)
            if response.status_code == 202:
                acked.update(r["signal_id"]["$oid"] for r in batch)
            else:
                refusals.append(response)
        assert refusals, "the disk never filled"
        for response in refusals:
            assert response.status_code == 503
            assert response.headers["Retry-After"]
            assert "storage" in response.json()["error"]
        assert daemon.get("/healthz").status_code == 200
        grow(small_disk)
        retry = [signal_record(i) for i in range(n, n + 10)]
        assert daemon.post(retry).status_code == 202
        acked.update(r["signal_id"]["$oid"] for r in retry)
        daemon.write_config(PAUSED.format(paused="false"))
        daemon.signal(signal.SIGHUP)
        wait_until(
            lambda: {r["signal_id"]["$oid"] for r in daemon.delivered()} >= acked, timeout=60
        )
        delivered = [r["signal_id"]["$oid"] for r in daemon.delivered()]
        report(
            "disk_full",
            acked=len(acked),
            refused_503=len(refusals),
            lost=len(acked - set(delivered)),
            duplicates=len(delivered) - len(set(delivered)),
        )
        assert daemon.stop() == 0
    finally:
        daemon.close()


def test_failed_fsync_refuses_exactly_those_requests(make_daemon) -> None:
    daemon = make_daemon(PAUSED.format(paused="false"))
    daemon.start(env={"FIREHOSED_FAIL_AT": "queue.fsync:4:3"})
    statuses = {}
    for n in range(10):
        response = daemon.post([signal_record(n)])
        statuses[n] = response.status_code
        if response.status_code == 503:
            assert response.headers["Retry-After"] and "storage" in response.json()["error"]
    assert [n for n, s in statuses.items() if s == 503] == [3, 4, 5]
    acked = {f"{n:024x}" for n, s in statuses.items() if s == 202}
    wait_until(lambda: {r["signal_id"]["$oid"] for r in daemon.delivered()} >= acked)
    delivered = [r["signal_id"]["$oid"] for r in daemon.delivered()]
    assert sorted(delivered) == sorted(acked)  # refused records were truncated away
    assert daemon.events("storage.write_failed")
    report("fsync_failure", refused=3, acked=len(acked), lost=len(acked - set(delivered)))
