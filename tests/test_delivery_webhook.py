"""Delivery through the real daemon to a real webhook receiver, with alert mails to aiosmtpd.

The receiver runs in the test's event loop, so every blocking call to the daemon runs in a
thread and every wait polls with `asyncio.sleep`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from tests.daemon import Daemon, signal_record
from tests.servers.smtp import running_smtp
from tests.servers.webhook import Reply, WebhookReceiver, webhook_receiver

__all__ = ["webhook_receiver"]  # the fixture, used by name

WEBHOOK = """
[alerts]
smtp = "{smtp}"
every = "1h"

[channels.hook]
type = "webhook"
url = "{url}/ingest"
secret = "{secrets}"
timeout = "2s"

[firehoses.stream]
account = "acme"
channel = "hook"
error_alert_email = "ops@acme.example"
alert_after = "0s"
"""


async def until(condition: Callable[[], Any], within: float = 20.0) -> Any:
    deadline = time.monotonic() + within
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
    return value


async def start(make_daemon, receiver: WebhookReceiver, smtp: str) -> Daemon:
    config = WEBHOOK.format(url=receiver.url, secrets=" ".join(receiver.secrets), smtp=smtp)
    daemon: Daemon = make_daemon(config)
    await asyncio.to_thread(daemon.start)
    return daemon


async def post(daemon: Daemon, records: list[dict[str, Any]]) -> None:
    response = await asyncio.to_thread(daemon.post, records)
    assert response.status_code == 202, response.text


def delivered_ids(receiver: WebhookReceiver) -> list[str]:
    ok = [d for d in receiver.deliveries if d.path == "/ingest"]
    return [r["signal_id"]["$oid"] for d in ok for r in json.loads(d.body)]


async def test_signed_batches_arrive_in_order(make_daemon, webhook_receiver) -> None:
    with running_smtp() as smtp:
        daemon = await start(make_daemon, webhook_receiver, smtp.address)
        await post(daemon, [signal_record(n) for n in range(3)])
        await post(daemon, [signal_record(n) for n in range(3, 5)])
        await until(lambda: len(delivered_ids(webhook_receiver)) == 5)
    assert delivered_ids(webhook_receiver) == [f"{n:024x}" for n in range(5)]
    for delivery in webhook_receiver.deliveries:
        assert delivery.verified == [True, True]  # both secrets sign during rotation
        assert delivery.headers["content-type"] == "application/json"
        assert delivery.headers["webhook-id"].startswith("msg_")


async def test_failures_then_success_deliver_once_with_one_id_and_mail_twice(
    make_daemon, webhook_receiver
) -> None:
    webhook_receiver.script(Reply(500), Reply(503, {"Retry-After": "2"}))
    with running_smtp() as smtp:
        daemon = await start(make_daemon, webhook_receiver, smtp.address)
        await post(daemon, [signal_record(1)])
        await until(lambda: len(webhook_receiver.deliveries) == 3)
        mails = await smtp.inbox.wait_for(2, within=20)
    attempts = webhook_receiver.deliveries
    assert len({d.headers["webhook-id"] for d in attempts}) == 1
    assert len({d.body for d in attempts}) == 1
    stamps = [int(d.headers["webhook-timestamp"]) for d in attempts]
    assert stamps[2] - stamps[1] >= 1  # Retry-After: 2 honoured (timestamps are whole seconds)
    failing, recovered = (m.message for m in mails[:2])
    assert "stream" in failing["Subject"] and "failing" in failing["Subject"]
    assert failing["To"] == "ops@acme.example"
    body = failing.get_content()
    assert "hook" in body
    assert "503" in body or "500" in body
    assert "recovered" in recovered["Subject"]
    status = await asyncio.to_thread(daemon.status)
    assert status["firehoses"]["stream"]["last_delivery"] is not None


async def test_410_stops_the_firehose_and_alerts(make_daemon, webhook_receiver) -> None:
    webhook_receiver.script(Reply(410))
    with running_smtp() as smtp:
        daemon = await start(make_daemon, webhook_receiver, smtp.address)
        await post(daemon, [signal_record(1)])
        mails = await smtp.inbox.wait_for(1, within=20)
        await post(daemon, [signal_record(2)])
        stream = await until(lambda: _queued(daemon, 2))
    assert stream["stopped"]
    assert len(webhook_receiver.deliveries) == 1  # nothing more is sent after 410
    assert "410" in mails[0].message.get_content()


def _queued(daemon: Daemon, count: int) -> dict[str, Any] | None:
    stream: dict[str, Any] = daemon.status()["firehoses"]["stream"]
    return stream if stream["queued_records"] == count else None


async def test_a_crash_after_the_put_sends_the_batch_again_with_its_id(
    make_daemon, webhook_receiver
) -> None:
    """A stream batch that keeps up is cut with its records' group commit: its manifest is
    a mark in the segment, no file. Killed after the receiver got it and before that was
    noted, the daemon sends the same batch again on restart: same webhook-id, same body."""
    with running_smtp() as smtp:
        config = WEBHOOK.format(
            url=webhook_receiver.url, secrets=" ".join(webhook_receiver.secrets), smtp=smtp.address
        )
        daemon: Daemon = make_daemon(config)
        await asyncio.to_thread(daemon.start, env={"FIREHOSED_CRASH_AT": "batch.after_put"})
        await post(daemon, [signal_record(n) for n in range(3)])
        await until(lambda: daemon.proc is not None and daemon.proc.poll() == 137)
        batches = daemon.root / "var" / "queues" / "stream" / "batches"
        assert not list(batches.glob("*.json"))  # the batch was held in its segment
        first = webhook_receiver.deliveries[0]
        await asyncio.to_thread(daemon.start)
        await post(daemon, [signal_record(n) for n in range(3, 5)])
        await until(lambda: len(delivered_ids(webhook_receiver)) == 8)
    again = webhook_receiver.deliveries[1]
    assert again.headers["webhook-id"] == first.headers["webhook-id"]
    assert again.body == first.body
    assert delivered_ids(webhook_receiver) == [f"{n:024x}" for n in [0, 1, 2, 0, 1, 2, 3, 4]]


async def test_a_stream_that_keeps_up_frees_its_segments_and_counts_its_bytes(
    make_daemon, webhook_receiver
) -> None:
    """No cut runs for such a stream, so delivering is what frees its segments; and
    `storage_bytes` (which `max_disk` is checked against) stays the bytes on disk."""
    with running_smtp() as smtp:
        config = WEBHOOK.format(
            url=webhook_receiver.url, secrets=" ".join(webhook_receiver.secrets), smtp=smtp.address
        )
        daemon: Daemon = make_daemon(config)
        text = daemon.config_path.read_text()
        daemon.config_path.write_text(
            text.replace("[storage]\n", '[storage]\nsegment_size = "1MiB"\n')
        )
        await asyncio.to_thread(daemon.start)
        padding = "x" * 700
        for first in range(0, 4000, 200):  # each delivered before the next: no cut at all
            await post(daemon, [signal_record(n, note=padding) for n in range(first, first + 200)])
            await until(lambda: len(delivered_ids(webhook_receiver)) == first + 200)  # noqa: B023
        queue = daemon.root / "var" / "queues" / "stream"
        status = await asyncio.to_thread(daemon.status)  # the last batch is forgotten
        while status["firehoses"]["stream"]["batches_pending"]:  # just after its receipt
            status = await asyncio.to_thread(daemon.status)
    segments = sorted((queue / "segments").glob("*.seg"))
    assert len(segments) <= 2, [p.name for p in segments]  # of 4+ MB written
    assert not list((queue / "batches").iterdir())  # every batch was cut by its commit
    on_disk = sum(p.stat().st_size for p in segments)
    assert status["storage_bytes"] == on_disk


MAX_WAIT = """
[channels.hook]
type = "webhook"
url = "{url}/ingest"
secret = "{secrets}"
max_records = 4
max_wait = "{max_wait}"

[firehoses.stream]
account = "acme"
channel = "hook"
"""


async def test_max_wait_gathers_a_trickle_into_full_batches(make_daemon, webhook_receiver) -> None:
    """With `max_wait`, single-record requests a few ms apart go out as requests of up to
    `max_records`, each cut when full or when its oldest record has waited that long;
    without it, each request's record goes out at once, alone."""
    secrets = " ".join(webhook_receiver.secrets)
    sizes: dict[str, list[int]] = {}
    for wait in ("0s", "1s"):
        config = MAX_WAIT.format(url=webhook_receiver.url, secrets=secrets, max_wait=wait)
        daemon: Daemon = make_daemon(config)
        await asyncio.to_thread(daemon.start)
        webhook_receiver.deliveries.clear()
        started = time.monotonic()
        for n in range(6):
            await post(daemon, [signal_record(n)])
        await until(lambda: len(delivered_ids(webhook_receiver)) == 6)
        took = time.monotonic() - started
        sizes[wait] = [len(json.loads(d.body)) for d in webhook_receiver.deliveries]
        assert delivered_ids(webhook_receiver) == [f"{n:024x}" for n in range(6)]
        await asyncio.to_thread(daemon.close)
        if wait == "1s":  # the last two waited out max_wait: not before, not much after
            assert 1.0 <= took < 3.0, took
    assert sizes["1s"] == [4, 2]
    assert len(sizes["0s"]) >= 4  # mostly one record per request
