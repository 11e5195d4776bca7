"""Run wrk with bench/post.lua against a URL and read its summary."""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import LOAD_CPU, REPO, TOKEN, pinned

LUA = REPO / "bench" / "post.lua"


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: requests completed in `seconds`, errors, latency."""

    requests: int
    seconds: float
    errors: int
    status_errors: int
    latency_p50_ms: float
    latency_p99_ms: float
    command: str

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds


def run(
    url: str,
    template: Path,
    *,
    seconds: float,
    connections: int,
    content_type: str,
    prefix: str,
) -> WrkResult:
    """wrk -t1 pinned to LOAD_CPU; RuntimeError if any request failed or was not 2xx."""
    argv = pinned(
        LOAD_CPU,
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(LUA),
            url,
            "--",
            str(template),
            prefix,
            content_type,
            TOKEN,
        ],
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    command = shlex.join(argv)
    summary = _summary(done.stdout)
    if done.returncode != 0 or summary is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {command}\n{done.stdout}{done.stderr}")
    errors = sum(summary[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    result = WrkResult(
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        errors=errors,
        status_errors=summary["status_errors"],
        latency_p50_ms=summary["latency_p50_us"] / 1000,
        latency_p99_ms=summary["latency_p99_us"] / 1000,
        command=command,
    )
    if result.requests == 0 and not (result.errors or result.status_errors) and seconds < 20:
        # Nothing finished in the window: a starved machine (a short --quick window), not a
        # failure. Measure again, longer, before calling it a crash.
        return run(
            url,
            template,
            seconds=seconds * 4,
            connections=connections,
            content_type=content_type,
            prefix=prefix,
        )
    if result.errors or result.status_errors or result.requests == 0:
        raise RuntimeError(f"wrk saw failed requests against {url}: {result}\n{done.stdout}")
    return result


def _summary(stdout: str) -> dict[str, int] | None:
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            parsed: dict[str, int] = json.loads(line.removeprefix("BENCH_JSON "))
            return parsed
    return None
