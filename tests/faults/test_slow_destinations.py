"""Slow and resetting destinations, behind a fault proxy.

A destination slower than ingest: the daemon keeps answering 202 and queues on disk, its
memory and file descriptors stay bounded, and 503 + Retry-After comes only once the
storage passes `storage.max_disk` (and goes once the backlog drains). A destination that
resets connections (a webhook, and an SFTP server): every acknowledged record arrives,
the daemon stays up, and repeats caused by lost answers are counted.

The daemon is a real `firehosed run` subprocess; the webhook receiver, the SFTP server
(asyncssh) and the proxy run in the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests

from tests.daemon import Daemon, signal_record
from tests.faults.proxy import FaultProxy, ProcessWatch, proxied, received, until
from tests.faults.report import report
from tests.servers.sftp import PASSWORD, USERNAME, asyncssh_sftp_server
from tests.servers.webhook import WebhookReceiver, webhook_receiver

__all__ = ["webhook_receiver"]  # the fixture, used by name

RSS_CEILING_MIB = 150
FDS_CEILING = 100
PADDING = "x" * 250  # about 330 bytes a record

STORAGE = """[storage]
max_disk = "{max_disk}"
segment_size = "1MiB"
"""

WEBHOOK = """
[channels.hook]
type = "webhook"
url = "http://{proxy}/ingest"
timeout = "30s"

[firehoses.stream]
account = "acme"
channel = "hook"
"""

SFTP = """
[channels.remote]
type = "sftp"
host = "127.0.0.1"
port = {port}
username = "{username}"
password = "{password}"
host_key = "{fingerprint}"
path = "/export"
connect_timeout = "5s"

[firehoses.files]
account = "acme"
channel = "remote"
format = "ndjson"
minutes_between_files = 0.02
"""


def records(first: int, count: int) -> list[dict[str, Any]]:
    return [signal_record(n, note=PADDING) for n in range(first, first + count)]


def ids(batch: list[dict[str, Any]]) -> list[str]:
    return [r["signal_id"]["$oid"] for r in batch]


async def webhook_daemon(make_daemon, proxy: FaultProxy, max_disk: str = "10GiB") -> Daemon:
    """A daemon delivering to the webhook through `proxy`, with 1 MiB queue segments."""
    daemon: Daemon = make_daemon(WEBHOOK.format(proxy=proxy.address))
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text.replace("[storage]\n", STORAGE.format(max_disk=max_disk)))
    await asyncio.to_thread(daemon.start)
    return daemon


def watch(daemon: Daemon) -> ProcessWatch:
    assert daemon.proc is not None
    return ProcessWatch(daemon.proc.pid)


async def post(daemon: Daemon, batch: list[dict[str, Any]]) -> requests.Response:
    return await asyncio.to_thread(daemon.post, batch)


async def status(daemon: Daemon) -> dict[str, Any]:
    return await asyncio.to_thread(daemon.status)


def assert_bounded(process: ProcessWatch) -> None:
    assert process.peak_rss_mib < RSS_CEILING_MIB, f"peak RSS {process.peak_rss_mib:.0f} MiB"
    assert process.peak_fds < FDS_CEILING, f"peak fds {process.peak_fds}"


# -- slow ---------------------------------------------------------------------------------


async def test_slow_destination_queues_on_disk_with_bounded_memory(
    make_daemon, webhook_receiver: WebhookReceiver
) -> None:
    """20 s of ingest at ~8x what a 20 KB/s destination takes: all 202, queued, bounded."""
    async with proxied(webhook_receiver) as proxy:
        await proxy.slow(20_000)
        daemon = await webhook_daemon(make_daemon, proxy)
        acked: list[str] = []
        posted = 0
        async with watch(daemon) as process:
            started = time.monotonic()
            while time.monotonic() - started < 20:
                batch = records(len(acked), 50)
                response = await post(daemon, batch)
                assert response.status_code == 202, response.text
                acked += ids(batch)
                posted += len(json.dumps(batch))
                await asyncio.sleep(0.1)
            queued = (await status(daemon))["firehoses"]["stream"]
            sent_slowly = proxy.bytes["up"]
            await proxy.pass_()
            drained_at = time.monotonic()
            await until(lambda: received(webhook_receiver).keys() >= set(acked), within=60)
            drain_s = time.monotonic() - drained_at
    assert queued["queued_records"] > len(acked) // 2  # the backlog waited on disk
    assert_bounded(process)
    copies = received(webhook_receiver)
    report(
        "slow destination 20 KB/s, 20 s ingest (webhook)",
        acked=len(acked),
        ingest_kib=posted // 1024,
        sent_while_slow_kib=sent_slowly // 1024,
        queued_at_end=queued["queued_records"],
        queued_kib=queued["queued_bytes"] // 1024,
        peak_rss_mib=round(process.peak_rss_mib, 2),
        peak_fds=process.peak_fds,
        lost=len(set(acked) - copies.keys()),
        duplicates=sum(copies.values()) - len(copies),
        drain_after_recovery_s=round(drain_s, 2),
    )


async def test_503_only_past_max_disk_and_202_again_after_draining(
    make_daemon, webhook_receiver: WebhookReceiver
) -> None:
    max_disk = 2 * 1024 * 1024
    async with proxied(webhook_receiver) as proxy:
        await proxy.slow(20_000)
        daemon = await webhook_daemon(make_daemon, proxy, max_disk="2MiB")
        acked, refused = await fill_until_refused(daemon, max_disk)
        peak = (await status(daemon))["storage_bytes"]
        await proxy.pass_()
        drained_at = time.monotonic()
        await until(lambda: received(webhook_receiver).keys() >= set(acked), within=60)
        used = await until(lambda: _used_below(daemon, max_disk), within=10)
        drain_s = time.monotonic() - drained_at
        again = records(10**6, 10)
        response = await post(daemon, again)
        assert response.status_code == 202, response.text
        acked += ids(again)
        await until(lambda: received(webhook_receiver).keys() >= set(acked))
    copies = received(webhook_receiver)
    assert copies.keys() == set(acked)  # lost = 0; nothing refused was stored
    report(
        "max_disk 2MiB behind a 20 KB/s destination (webhook)",
        acked=len(acked),
        refused_records=refused,
        storage_kib_at_refusal=peak // 1024,
        storage_kib_after_drain=used // 1024,
        drain_s=round(drain_s, 2),
        lost=len(set(acked) - copies.keys()),
    )


async def fill_until_refused(daemon: Daemon, max_disk: int) -> tuple[list[str], int]:
    """POST until the first 503; check no 503 came below max_disk. (acked ids, refused)."""
    acked: list[str] = []
    for _ in range(400):
        used = (await status(daemon))["storage_bytes"]
        batch = records(len(acked), 100)
        response = await post(daemon, batch)
        if response.status_code == 202:
            acked += ids(batch)
            continue
        # Only ingest adds to storage and this test is its only client: `used` is an
        # upper bound of what the daemon saw when it answered.
        assert used > max_disk, f"503 with {used} bytes stored, max_disk {max_disk}"
        assert response.status_code == 503, response.text
        assert response.headers.get("Retry-After"), "503 without Retry-After"
        stored = re.search(r"storage is full: (\d+) bytes", response.json()["error"])
        assert stored and int(stored.group(1)) > max_disk, response.text
        return acked, len(batch)
    raise AssertionError("max_disk never reached")


def _used_below(daemon: Daemon, limit: int) -> int | None:
    used: int = daemon.status()["storage_bytes"]
    return used if used <= limit else None


# -- resetting ----------------------------------------------------------------------------


async def test_resetting_webhook_loses_nothing(
    make_daemon, webhook_receiver: WebhookReceiver
) -> None:
    """Requests torn mid-body, then answers lost after the receiver got them, then pass."""
    async with proxied(webhook_receiver) as proxy:
        daemon = await webhook_daemon(make_daemon, proxy)
        acked: list[str] = []
        async with watch(daemon) as process:
            for direction, after in (("up", 2000), ("down", 0)):
                await proxy.reset(after, direction=direction, probability=0.5)
                acked += await post_for(daemon, 4.0, len(acked))
            await proxy.pass_()
            recovered_at = time.monotonic()
            await until(lambda: received(webhook_receiver).keys() >= set(acked), within=60)
            delivered_s = time.monotonic() - recovered_at
            health = await asyncio.to_thread(daemon.get, "/healthz")
        failed = len(await asyncio.to_thread(daemon.events, "batch.failed"))
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert health.status_code == 200
    assert proxy.resets > 0 and failed > 0  # the faults did happen
    assert_bounded(process)
    copies = received(webhook_receiver)
    report(
        "resetting webhook (4 s torn requests, 4 s lost answers)",
        acked=len(acked),
        lost=len(set(acked) - copies.keys()),
        duplicates=sum(copies.values()) - len(copies),
        resets=proxy.resets,
        connections=proxy.connections,
        failed_attempts=failed,
        peak_fds=process.peak_fds,
        peak_rss_mib=round(process.peak_rss_mib, 2),
        delivered_after_recovery_s=round(delivered_s, 2),
    )


async def test_resetting_sftp_loses_nothing_and_leaves_no_part_files(
    make_daemon, tmp_path: Path
) -> None:
    root = tmp_path / "sftp"
    root.mkdir()
    async with asyncssh_sftp_server(root) as server, FaultProxy("127.0.0.1", server.port) as proxy:
        daemon: Daemon = make_daemon(
            SFTP.format(
                port=proxy.port,
                username=USERNAME,
                password=PASSWORD,
                fingerprint=server.fingerprint,
            )
        )
        await asyncio.to_thread(daemon.start)
        async with watch(daemon) as process:
            # Past the SSH handshake, uploads are torn now and then.
            await proxy.reset(16_000, direction="up", probability=0.15)
            acked = await post_for(daemon, 6.0, 0, per_post=100)
            await proxy.pass_()
            recovered_at = time.monotonic()
            await until(lambda: sftp_ids(root).keys() >= set(acked), within=60)
            delivered_s = time.monotonic() - recovered_at
            health = await asyncio.to_thread(daemon.get, "/healthz")
        failed = len(await asyncio.to_thread(daemon.events, "batch.failed"))
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert health.status_code == 200
    assert proxy.resets > 0 and failed > 0
    assert_bounded(process)
    copies = sftp_ids(root)
    assert not list(root.glob("**/.*.part"))  # every torn upload was redone and renamed
    report(
        "resetting sftp (6 s of uploads torn at random)",
        acked=len(acked),
        lost=len(set(acked) - copies.keys()),
        duplicates=sum(copies.values()) - len(copies),
        files=len(sftp_files(root)),
        resets=proxy.resets,
        ssh_connections=server.connections,
        failed_attempts=failed,
        peak_fds=process.peak_fds,
        peak_rss_mib=round(process.peak_rss_mib, 2),
        delivered_after_recovery_s=round(delivered_s, 2),
    )


async def post_for(daemon: Daemon, seconds: float, first: int, per_post: int = 10) -> list[str]:
    """POST `per_post` records every 0.2 s for `seconds`; all must be acknowledged."""
    acked: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = records(first + len(acked), per_post)
        response = await post(daemon, batch)
        assert response.status_code == 202, response.text
        acked += ids(batch)
        await asyncio.sleep(0.2)
    return acked


def sftp_files(root: Path) -> list[Path]:
    return [p for p in (root / "export").glob("**/*.ndjson") if not p.name.startswith(".")]


def sftp_ids(root: Path) -> Counter[str]:
    """Record ids in the delivered files on the SFTP server, with their counts."""
    found: Counter[str] = Counter()
    for path in sftp_files(root):
        for line in path.read_bytes().splitlines():
            if line:
                found[json.loads(line)["signal_id"]["$oid"]] += 1
    return found
