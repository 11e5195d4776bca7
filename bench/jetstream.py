"""Scale-out on NATS JetStream: signals/s for one and two firehosed processes against one
three-server cluster (R3) on this machine, and what each part costs per signal.

    PYTHONPATH=. .venv/bin/python -m bench.jetstream [--seconds 10] [--reps 2] [--batch 100]

Each repetition measures, back to back and with the same wrk load (NDJSON requests of
`--batch` signals, 32 connections per process):

- local:   one process on the local backend (fsync): the single-machine figure;
- js x1:   one process on the cluster;
- js x2:   two processes on the cluster, one wrk each, at once.

Everything shares this machine's cores (wrk pinned to CPU 1, daemons and servers not
pinned): the figures say what the parts cost, not what N machines would reach. From the
CPU each process class used (user + system, /proc) per acknowledged signal, the report
gives a model of N machines, each running one firehosed, against a three-server cluster.
Every signal acknowledged must be delivered (counted in the export files) before a
repetition ends; a figure from a run that lost one is not a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

from bench import fixtures, wrk
from bench.procs import Daemon, cpu_times, firehose_toml, wait_until
from tests.servers.nats import NatsCluster

NDJSON = "application/x-ndjson"
CONNECTIONS = 32


def _config(daemon: Daemon, cluster: NatsCluster | None, prefix: str, export: Path) -> None:
    text = daemon.config_path.read_text().replace(
        'path = "' + str(daemon.root / "export") + '"', f'path = "{export}"'
    )
    if cluster is not None:
        text = text.replace("[storage]\n", '[storage]\nbackend = "jetstream"\n', 1)
        text += (
            f"\n[jetstream]\nservers = {json.dumps(cluster.urls)}\nprefix = {json.dumps(prefix)}\n"
        )
    daemon.write_config(text)


def _delivered(export: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in export.rglob("*.ndjson"))


def _cpu(pids: list[int]) -> float:
    return sum(sum(cpu_times(pid)) for pid in pids)


def run_once(
    work: Path, cluster: NatsCluster | None, processes: int, seconds: float, batch: int
) -> dict[str, float]:
    """One measurement: signals/s acknowledged, and CPU seconds per signal by part."""
    prefix = fixtures.new_prefix()
    export = work / f"export-{prefix}"
    export.mkdir()
    tables = firehose_toml("files", format="ndjson", minutes_between_files=0.05)
    daemons = []
    for index in range(processes):
        daemon = Daemon(work / f"{prefix}-{index}", tables, cpu=None)
        _config(daemon, cluster, f"b{prefix[:8]}", export)
        daemons.append(daemon.start())
    template = work / f"template-{batch}.txt"
    if not template.exists():
        template.write_text(fixtures.template_text(batch))
    try:
        for daemon in daemons:  # warm-up
            wrk.run(
                daemon.signals_url,
                template,
                seconds=2,
                connections=CONNECTIONS,
                content_type=NDJSON,
                prefix=fixtures.new_prefix(),
            )
        servers = [s.process.pid for s in cluster.servers if s.process] if cluster else []
        own = [d.pid for d in daemons]
        cpu_before = (_cpu(own), _cpu(servers))
        accepted_before = sum(d.accepted() for d in daemons)
        results: list[wrk.WrkResult] = []

        def load(daemon: Daemon) -> None:
            results.append(
                wrk.run(
                    daemon.signals_url,
                    template,
                    seconds=seconds,
                    connections=CONNECTIONS,
                    content_type=NDJSON,
                    prefix=fixtures.new_prefix(),
                )
            )

        threads = [threading.Thread(target=load, args=(d,)) for d in daemons]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        accepted = sum(d.accepted() for d in daemons) - accepted_before
        cpu_daemons, cpu_servers = _cpu(own) - cpu_before[0], _cpu(servers) - cpu_before[1]
        acknowledged = sum(d.accepted() for d in daemons)
        wait_until(lambda: _delivered(export) >= acknowledged, 120, "every signal delivered")
        for daemon in daemons:
            daemon.check_no_errors()
        return {
            "signals_per_s": accepted / elapsed,
            "daemon_us": cpu_daemons / accepted * 1e6,
            "servers_us": cpu_servers / accepted * 1e6,
            "p99_ms": max(r.latency_p99_ms for r in results),
            "delivered": _delivered(export),
            "acknowledged": acknowledged,
        }
    finally:
        for daemon in daemons:
            daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument(
        "--sync-always",
        action="store_true",
        help="servers fsync every write (sync_interval: always); default: nats-server's"
        " own (every 2 min), what an R3 cluster usually runs: a PubAck then means held by"
        " two servers, written to their OS",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-jetstream-"))
    cluster = NatsCluster(work / "nats", sync=args.sync_always)
    cluster.start()
    asyncio.run(cluster.wait_ready())
    rows: dict[str, list[dict[str, float]]] = {"local": [], "js x1": [], "js x2": []}
    try:
        for _ in range(args.reps):
            rows["local"].append(run_once(work, None, 1, args.seconds, args.batch))
            rows["js x1"].append(run_once(work, cluster, 1, args.seconds, args.batch))
            rows["js x2"].append(run_once(work, cluster, 2, args.seconds, args.batch))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(rows, args)


def report(rows: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    local = max(r["signals_per_s"] for r in rows["local"])
    sync = "sync_interval: always" if args.sync_always else "default sync_interval (2 min)"
    print(
        f"NDJSON batch {args.batch}, {CONNECTIONS} connections per process, {args.seconds:g} s,"
        f" servers with {sync}"
    )
    print("setup   signals/s (best; all reps)       ratio to local   daemon µs/sig  servers µs/sig")
    for name, measured in rows.items():
        best = max(measured, key=lambda r: r["signals_per_s"])
        every = ", ".join(f"{r['signals_per_s']:,.0f}" for r in measured)
        print(
            f"{name:7} {best['signals_per_s']:>10,.0f} ({every:20}) "
            f"{best['signals_per_s'] / local:>8.2f}x  {best['daemon_us']:>14.1f} "
            f"{best['servers_us']:>15.1f}   p99 {best['p99_ms']:.0f} ms"
        )
        for r in measured:
            assert r["delivered"] >= r["acknowledged"], f"{name}: lost signals: {r}"
    js = min(rows["js x2"], key=lambda r: r["daemon_us"] + r["servers_us"])
    daemon_us, servers_us = js["daemon_us"], js["servers_us"]
    print(
        "\nModel of N machines, each one firehosed on its own core, against a three-server"
        f" cluster whose servers have C cores in all: signals/s ≈ min(N * 1e6/{daemon_us:.0f},"
        f" C * 1e6/{servers_us:.0f}) (the firehosed part scales with N; every signal costs"
        f" the cluster {servers_us:.0f} µs of CPU across its three replicas, whatever N)."
    )


if __name__ == "__main__":
    main()
