"""Destination outages: a webhook behind a fault proxy goes down, then comes back.

Everything acknowledged (202) is delivered after the outage, with exactly one failure
mail and one recovery mail per incident; past `retry_for` the batch is dead-lettered,
mailed, and `firehosed replay` delivers it once the destination is back.

The daemon is a real `firehosed run` subprocess; the receiver (aiohttp), the proxy and
the SMTP server (aiosmtpd) are real servers on 127.0.0.1. The receiver and the proxy run
in the test's event loop, so blocking calls to the daemon run in threads.

While signals keep arriving, a down destination must still be retried with backoff,
not once per ingest commit.

The 10-minute outage runs only with FIREHOSED_FAULTS_FULL=1.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from tests.daemon import Daemon, signal_record
from tests.faults.proxy import FaultProxy, proxied, received, until
from tests.faults.report import full, report
from tests.servers.smtp import SmtpServer, running_smtp
from tests.servers.webhook import webhook_receiver

__all__ = ["webhook_receiver"]  # the fixture, used by name

FULL = pytest.mark.skipif(
    not full(),
    reason="long fault scenario: set FIREHOSED_FAULTS_FULL=1 to run it",
)

STREAM = """
[alerts]
smtp = "{smtp}"
every = "1h"

[channels.hook]
type = "webhook"
url = "http://{proxy}/ingest"
timeout = "2s"

[firehoses.stream]
account = "acme"
channel = "hook"
error_alert_email = "ops@acme.example"
alert_after = "{alert_after}"
retry_for = "{retry_for}"
"""

POST_EVERY = 0.5  # seconds between requests while the destination is down
RECORDS_PER_POST = 10
# After an outage, the next retry may be up to the backoff cap (5 min) away.
RECOVERY_WITHIN = 330.0


async def start_daemon(make_daemon, proxy: FaultProxy, smtp: SmtpServer, **keys: str) -> Daemon:
    settings = {"alert_after": "1s", "retry_for": "1h", **keys}
    daemon: Daemon = make_daemon(STREAM.format(proxy=proxy.address, smtp=smtp.address, **settings))
    await asyncio.to_thread(daemon.start)
    return daemon


async def post(daemon: Daemon, first: int, count: int = RECORDS_PER_POST) -> list[str]:
    """POST `count` signals numbered from `first`; they must be acknowledged. Their ids."""
    records = [signal_record(n) for n in range(first, first + count)]
    response = await asyncio.to_thread(daemon.post, records)
    assert response.status_code == 202, response.text
    return [r["signal_id"]["$oid"] for r in records]


def subjects(smtp: SmtpServer) -> list[str]:
    return [str(mail.message["Subject"]) for mail in smtp.inbox.received]


@pytest.mark.parametrize(
    "outage",
    [
        pytest.param(30.0, marks=pytest.mark.timeout(240), id="30s"),
        pytest.param(600.0, marks=[FULL, pytest.mark.timeout(1200)], id="full-600s"),
    ],
)
async def test_outage_loses_nothing_and_mails_once_plus_recovery(
    make_daemon, webhook_receiver, outage: float
) -> None:
    with running_smtp() as smtp:
        async with proxied(webhook_receiver) as proxy:
            daemon = await start_daemon(make_daemon, proxy, smtp)
            acked = await post(daemon, 0, 1)
            await until(lambda: received(webhook_receiver).keys() >= set(acked))
            await proxy.down()
            during = await keep_posting(daemon, len(acked), outage)
            acked += during
            attempts = len(await asyncio.to_thread(daemon.events, "batch.failed"))
            await smtp.inbox.wait_for(1, within=10)
            assert len(smtp.inbox.received) == 1  # one failure mail for the whole outage
            await proxy.pass_()
            recovered_at = time.monotonic()
            before = set(acked)
            # Signals keep arriving after the recovery, as they do in production.
            acked += await keep_posting(
                daemon,
                len(acked),
                RECOVERY_WITHIN,
                lambda: received(webhook_receiver).keys() >= before,
            )
            delivered_in = time.monotonic() - recovered_at
            await until(lambda: received(webhook_receiver).keys() >= set(acked))
            await smtp.inbox.wait_for(2, within=10)
            assert await asyncio.to_thread(daemon.stop) == 0  # also flushes mails in flight
    failing, recovered = subjects(smtp)
    assert "firehose stream failing" in failing
    assert "firehose stream recovered" in recovered
    copies = received(webhook_receiver)
    assert set(acked) - copies.keys() == set()  # lost = 0
    report(
        f"outage {outage:.0f}s (webhook, down = connection refused)",
        acked=len(acked),
        lost=len(set(acked) - copies.keys()),
        duplicates=sum(copies.values()) - len(copies),
        failed_attempts=attempts,
        requests_during_outage=len(during) // RECORDS_PER_POST,
        mails=len(smtp.inbox.received),
        delivered_after_recovery_s=round(delivered_in, 2),
    )


async def keep_posting(
    daemon: Daemon, first: int, seconds: float, done: Callable[[], bool] | None = None
) -> list[str]:
    """POST a request every POST_EVERY seconds for `seconds`; the ids acknowledged.

    With `done`, stop as soon as it is true, and fail if it is not within `seconds`.
    """
    acked: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if done is not None and done():
            return acked
        acked += await post(daemon, first + len(acked))
        await asyncio.sleep(POST_EVERY)
    assert done is None or done(), f"not done within {seconds}s"
    return acked


async def test_backoff_holds_while_signals_keep_arriving(make_daemon, webhook_receiver) -> None:
    with running_smtp() as smtp:
        async with proxied(webhook_receiver) as proxy:
            await proxy.down()
            daemon = await start_daemon(make_daemon, proxy, smtp)
            started = time.monotonic()
            await keep_posting(daemon, 0, 8.0)
            attempts = len(await asyncio.to_thread(daemon.events, "batch.failed"))
            elapsed = time.monotonic() - started
    report(
        "backoff while ingest continues (webhook down)",
        seconds=round(elapsed, 2),
        requests=round(8.0 / POST_EVERY),
        failed_attempts=attempts,
    )
    # Full jitter from 1 s doubling: about log2(8) + a few attempts in 8 s, never ~one
    # per request.
    assert attempts <= 10


async def test_past_retry_for_dead_letters_then_replay_delivers(
    make_daemon, webhook_receiver
) -> None:
    with running_smtp() as smtp:
        async with proxied(webhook_receiver) as proxy:
            await proxy.down()
            daemon = await start_daemon(make_daemon, proxy, smtp, retry_for="2s", alert_after="1h")
            acked = await post(daemon, 0, 5)
            events = await until(lambda: daemon.events("batch.dead_lettered"), within=30)
            dead_at = time.monotonic()
            assert events[0]["records"] == 5 and events[0]["firehose"] == "stream"
            metrics = (await asyncio.to_thread(daemon.admin, "/metrics")).text
            assert 'firehosed_batches_dead_lettered_total{firehose="stream"} 1.0' in metrics
            (mail,) = await smtp.inbox.wait_for(1, within=10)
            assert "dead-lettered batch" in str(mail.message["Subject"])
            dead = daemon.root / "var" / "dead" / "stream"
            assert len(list(dead.glob("*.data"))) == 1
            assert not received(webhook_receiver)
            await proxy.pass_()
            replayed = await asyncio.to_thread(daemon.cli, "replay")
            assert replayed.returncode == 0, replayed.stderr
            assert "replay stream: 1 batches back in delivery" in replayed.stdout
            await until(lambda: received(webhook_receiver).keys() >= set(acked))
            delivered_in = time.monotonic() - dead_at
    assert not list(dead.glob("*.json"))
    copies = received(webhook_receiver)
    assert copies == Counter(acked)  # lost = 0, and the replay sent it once
    report(
        "retry_for 2s then replay (webhook)",
        acked=len(acked),
        lost=len(set(acked) - copies.keys()),
        dead_lettered=len(events),
        dead_letter_after_s=round(_dead_letter_age(events[0], daemon), 2),
        replay_to_delivered_s=round(delivered_in, 2),
    )


def _dead_letter_age(event: dict[str, Any], daemon: Daemon) -> float:
    """Seconds from the batch's cut to its dead-lettering, from the daemon's own log."""
    cut = next(e for e in daemon.events("batch.cut") if e["batch"] == event["batch"])
    return _log_time(event) - _log_time(cut)


def _log_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()
