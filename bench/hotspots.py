"""Profiles for missed targets: the daemon (or the code under test) under the same load.

Each runs the workload once more, unmeasured, with py-spy attached (or launching the
process), and returns the markdown of `profile.summarize`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from bench import profile
from bench.latency_figures import _webhook_tables
from bench.procs import LOAD_CPU, PYTHON, REPO, SERVER_CPU, Daemon, free_port, pinned
from bench.recovery import FIREHOSE, _tables, build_snapshot, evict
from bench.settings import Settings

PY_SPY_ARGS = ["record", "--rate", "250", "--threads", "--format", "raw", "--nonblocking"]


def _exe() -> str:
    return str(profile.PY_SPY) if profile.PY_SPY.exists() else "py-spy"


def latency(settings: Settings) -> list[str]:
    """The daemon delivering to a webhook at 1k signals/s, single-signal POSTs."""
    port = free_port()
    root = settings.work / "profile-latency"
    daemon = Daemon(root, _webhook_tables(port)).start()
    raw = settings.work / "profile-latency.txt"
    try:
        load = subprocess.Popen(
            pinned(
                LOAD_CPU,
                [
                    PYTHON,
                    "-m",
                    "bench.latency",
                    "--target",
                    daemon.signals_url,
                    "--port",
                    str(port),
                    "--load",
                    "1000:1",
                    "--warmup",
                    "1",
                    "--seconds",
                    f"{settings.profile_seconds + 1:g}",
                ],
            ),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        time.sleep(1.5)
        spy = profile.record(daemon.pid, settings.profile_seconds, raw)
        spy.communicate(timeout=120)
        load.wait(timeout=120)
        return profile.summarize(raw, "Latency, 1k signals/s to a webhook")
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def memory(settings: Settings, sessions: int) -> list[str]:
    """bench.memory launched under py-spy (CatchUp.buffer fed as the router does)."""
    raw = settings.work / "profile-memory.txt"
    argv = pinned(
        SERVER_CPU,
        [_exe(), *PY_SPY_ARGS, "-o", str(raw), "--", PYTHON, "-m", "bench.memory", str(sessions)],
    )
    subprocess.run(argv, cwd=REPO, capture_output=True, timeout=3600, check=True)
    return profile.summarize(raw, f"Catch-up rings, {sessions:,} sessions x 5 signals")


def recovery(settings: Settings) -> list[str]:
    """A cold restart on the crashed snapshot, launched under py-spy until first delivery."""
    snapshot, _, _ = build_snapshot(settings)
    root = settings.work / "profile-recovery"
    shutil.copytree(snapshot / "var", root / "var")
    evict(root / "var")
    daemon = Daemon(root, _tables(paused=False))
    raw = settings.work / "profile-recovery.txt"
    argv = pinned(
        SERVER_CPU,
        [
            _exe(),
            *PY_SPY_ARGS,
            "-o",
            str(raw),
            "--",
            PYTHON,
            "-m",
            "firehosed",
            "run",
            "-c",
            str(daemon.config_path),
        ],
    )
    with open(daemon.log_path, "ab") as log:
        spy = subprocess.Popen(argv, cwd=root, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 300
        while not daemon.events("batch.delivered") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for pid in _children(spy.pid):
            subprocess.run(["kill", "-TERM", str(pid)], check=False)
        spy.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(snapshot, ignore_errors=True)
    return profile.summarize(
        raw, f"Restart recovery of firehose {FIREHOSE}, spawn to first delivery"
    )


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc: no procps needed)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
