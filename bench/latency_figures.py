"""POST → webhook receipt latency of the daemon vs the relay ceiling, at 1k and 10k signals/s.

Per repetition, the relay (bench/noop_server.py --relay: 202, then one POST of the
request's records to the webhook, no disk) and a fresh daemon (webhook channel with its
defaults, `max_records` 500, durability fsync) each get the same load from
bench/latency.py, pinned to the load CPU, which also runs the webhook receiver.
1k signals/s is 1000 POSTs/s of one signal; 10k signals/s is 1000 POSTs/s of ten
(NDJSON), so the request rate stays well inside what one core serves.
"""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Any

from bench.latency import DRAIN_TIMEOUT, REQUEST_TIMEOUT, percentile
from bench.procs import (
    LOAD_CPU,
    PYTHON,
    REPO,
    Daemon,
    NoopServer,
    event_time,
    firehose_toml,
    free_port,
    pinned,
)
from bench.report import Figure, Series, ratios
from bench.settings import Settings

LOADS = {"1k": "1000:1", "10k": "10000:10"}


def _load(target: str, port: int, settings: Settings) -> tuple[list[dict[str, Any]], str]:
    argv = [PYTHON, "-m", "bench.latency", "--target", target, "--port", str(port)]
    for load in LOADS.values():
        argv += ["--load", load]
    argv += [
        "--seconds",
        f"{settings.latency_seconds:g}",
        "--warmup",
        f"{settings.latency_warmup:g}",
    ]
    argv = pinned(LOAD_CPU, argv)
    # Per load: the offered load, then at worst one request timeout and the drain wait.
    per_load = settings.latency_seconds + settings.latency_warmup + REQUEST_TIMEOUT + DRAIN_TIMEOUT
    try:
        done = subprocess.run(
            argv,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=len(LOADS) * per_load + 60,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"latency load hung: {shlex.join(argv)}\n{exc.stderr!r:.3000}") from exc
    if done.returncode != 0:
        raise RuntimeError(f"latency load failed: {shlex.join(argv)}\n{done.stderr[-3000:]}")
    results: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    for result in results:
        if result["lost"] or result["bad_status"] or not result["measured"]:
            raise RuntimeError(f"latency load against {target} lost or failed signals: {result}")
    return results, shlex.join(argv)


def _webhook_tables(port: int) -> str:
    return (
        f'\n[channels.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:{port}/hook"\n'
        + firehose_toml("hooked", channel="hook")
    )


def _relay_run(settings: Settings, port: int) -> tuple[list[dict[str, Any]], list[str]]:
    server = NoopServer.start(relay=f"http://127.0.0.1:{port}/hook")
    try:
        results, command = _load(server.signals_url, port, settings)
    finally:
        server.stop()
    return results, [" ".join(server.argv) + "   # relay ceiling", command]


@dataclass
class Breakdown:
    """Where a daemon's latency goes, per load: the 202, and cut → delivered per batch."""

    ack_p50: list[float] = field(default_factory=list)
    ack_p99: list[float] = field(default_factory=list)
    deliver: list[float] = field(default_factory=list)
    records: list[float] = field(default_factory=list)
    batches_per_s: list[float] = field(default_factory=list)


def _daemon_run(
    settings: Settings, rep: int, port: int, breakdown: dict[str, Breakdown]
) -> tuple[list[dict[str, Any]], list[str], int]:
    root = settings.work / f"latency-{rep}"
    node = Daemon(root, _webhook_tables(port)).start()
    try:
        results, command = _load(node.signals_url, port, settings)
        node.check_no_errors()
        cuts = {e["batch"]: event_time(e) for e in node.events("batch.cut")}
        delivered = node.events("batch.delivered")
        retries = len(node.events("batch.failed"))
    finally:
        node.stop()
        shutil.rmtree(root, ignore_errors=True)
    for name, result in zip(LOADS, results, strict=True):
        mine = [e for e in delivered if result["wall_start"] <= event_time(e) <= result["wall_end"]]
        into = breakdown[name]
        into.ack_p50.append(result["ack_p50_ms"])
        into.ack_p99.append(result["ack_p99_ms"])
        into.deliver += [(event_time(e) - cuts[e["batch"]]) * 1000 for e in mine]
        into.records += [e["records"] for e in mine]
        into.batches_per_s.append(len(mine) / (result["wall_end"] - result["wall_start"]))
    return results, [" ".join(node.argv), command], retries


def _breakdown_table(
    breakdown: dict[str, Breakdown], relay_acks: dict[str, list[float]]
) -> list[str]:
    lines = [
        "| load | daemon 202 p50 / p99 | relay 202 p50 | batch.cut → batch.delivered "
        "p50 / p99 | records per webhook POST (median) | webhook POSTs/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, b in breakdown.items():
        lines.append(
            f"| {name} signals/s | {statistics.median(b.ack_p50):.2f} / "
            f"{statistics.median(b.ack_p99):.2f} ms | {statistics.median(relay_acks[name]):.2f} ms "
            f"| {percentile(b.deliver, 50):.2f} / {percentile(b.deliver, 99):.2f} ms "
            f"| {statistics.median(b.records):.0f} | {statistics.median(b.batches_per_s):.0f} |"
        )
    return lines


def figures(settings: Settings) -> list[Figure]:
    keys = [(load, q) for load in LOADS for q in ("p50", "p99")]
    daemon = {k: Series("ms") for k in keys}
    relay = {k: Series("ms") for k in keys}
    breakdown = {name: Breakdown() for name in LOADS}
    relay_acks: dict[str, list[float]] = {name: [] for name in LOADS}
    lags: list[float] = []
    retries = 0
    commands: list[str] = []
    for rep in range(settings.latency_reps):
        for which in ("relay", "daemon") if rep % 2 == 0 else ("daemon", "relay"):
            port = free_port()
            if which == "relay":
                results, run_commands = _relay_run(settings, port)
                for name, result in zip(LOADS, results, strict=True):
                    relay_acks[name].append(result["ack_p50_ms"])
            else:
                results, run_commands, failed = _daemon_run(settings, rep, port, breakdown)
                retries += failed
            commands += run_commands
            into = relay if which == "relay" else daemon
            for name, result in zip(LOADS, results, strict=True):
                into[(name, "p50")].add(result["p50_ms"])
                into[(name, "p99")].add(result["p99_ms"])
                lags.append(result["lag_p99_ms"])
    out = []
    for name, q in keys:
        limit = 5.0 if q == "p50" else 25.0
        figure = Figure(
            title=f"POST → webhook receipt latency {q} at {name} signals/s",
            target=f"{q} ≤ {limit:g} ms",
            result=daemon[(name, q)],
            ceiling=relay[(name, q)],
            ceiling_label="relay (202, then POST to webhook, no disk)",
            ratio=ratios(daemon[(name, q)], relay[(name, q)]),
            passed=daemon[(name, q)].median <= limit,
        )
        out.append(figure)
    out[0].commands = commands
    out[0].tables = _breakdown_table(breakdown, relay_acks)
    out[0].notes += [
        "Open-loop aiohttp client and webhook receiver in one process on CPU 1; "
        f"{settings.latency_warmup:g} s warm-up then {settings.latency_seconds:g} s measured "
        "per load; every signal must arrive (none lost, every POST 202).",
        "1k signals/s = 1000 POSTs/s x 1 signal; 10k signals/s = 1000 POSTs/s x 10 (NDJSON).",
        f"Generator schedule lag p99 (worst run): {max(lags):.2f} ms; failed webhook "
        f"attempts retried by the daemon: {retries}.",
        "Ratio = daemon / relay (how many times the two-hop floor).",
        "Breakdown below: the 202 (client-side, includes the group-commit fsync) and the "
        "daemon's own `batch.cut` → `batch.delivered` log events per webhook batch. "
        "`batch.cut` is logged once the batch is on disk: for a stream that keeps up, "
        "when the group commit that wrote and synced its records (and its manifest, as a "
        "mark) ends, as the 202s go out; for a batch cut on its own, after its read-back, "
        "encoding and sync. What lies between the 202 and `batch.cut` is the rest.",
    ]
    return out
