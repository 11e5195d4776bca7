"""Alert e-mails against a real SMTP server (aiosmtpd): content, rate limit, recovery,
dead letters, SMTP failures that never reach the caller, and a bounded close."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from firehosed import metrics
from firehosed.alerts import Alerts, Incident, compose, human_age, smtp_address
from firehosed.config import AlertsConfig
from firehosed.units import dec_hook
from tests.servers.smtp import (
    PASSWORD,
    USERNAME,
    Inbox,
    SmtpServer,
    free_port,
    running_smtp,
    smtp_server,
    tls_smtp_server,
)

__all__ = ["smtp_server", "tls_smtp_server"]  # fixtures, imported for pytest

TO = "ops@acme.example"
FIRST_FAILURE = 1_763_895_480.0  # 2025-11-23T10:58:00Z
Logs = list[MutableMapping[str, Any]]


def config(smtp: str, **keys: Any) -> AlertsConfig:
    return msgspec.convert(
        {"smtp": smtp, "from": "firehosed@example.net", "timeout": "5s", **keys},
        AlertsConfig,
        dec_hook=dec_hook,
    )


def incident(firehose: str, error: str = "Connection refused (sftp.example.com:22)") -> Incident:
    return Incident(
        firehose=firehose,
        channel="partner_sftp",
        error=error,
        backlog_records=1234,
        backlog_bytes=5_872_025,
        oldest_age=750.0,
        first_failure=FIRST_FAILURE,
    )


def sent(firehose: str, kind: str) -> float:
    labels = {"firehose": firehose, "kind": kind}
    return metrics.REGISTRY.get_sample_value("firehosed_alerts_sent_total", labels) or 0.0


def failed() -> float:
    return metrics.REGISTRY.get_sample_value("firehosed_alerts_failed_total") or 0.0


@pytest.fixture
def logs() -> Iterator[Logs]:
    with capture_logs() as captured:
        yield captured


async def test_failure_mail_names_everything(smtp_server: SmtpServer) -> None:
    alerts = Alerts(config(smtp_server.address))
    alerts.failing(TO, incident("content_fh"))
    [mail] = await smtp_server.inbox.wait_for(1)
    await alerts.close()

    msg = mail.message
    assert msg["Subject"] == (
        "[firehosed] firehose content_fh failing: Connection refused (sftp.example.com:22)"
    )
    assert msg["From"] == "firehosed@example.net"
    assert msg["To"] == TO
    assert mail.rcpt_tos == [TO]
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith(">")
    assert abs(msg["Date"].datetime.timestamp() - time.time()) < 60
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg.get_content_type() == "text/plain"
    body = msg.get_content()
    for fact in (
        "content_fh",
        "partner_sftp",
        "Connection refused (sftp.example.com:22)",
        "1,234 records, 5.6 MiB",
        "12m 30s",
        "2025-11-23T10:58:00Z",
        "Host:",
    ):
        assert fact in body
    assert sent("content_fh", "failing") == 1


async def test_second_failure_within_every_sends_nothing(smtp_server: SmtpServer) -> None:
    alerts = Alerts(config(smtp_server.address, every="1h"))
    for _ in range(5):
        alerts.failing(TO, incident("quiet_fh"))
    await alerts.close()
    assert len(smtp_server.inbox.received) == 1
    assert sent("quiet_fh", "failing") == 1


async def test_rate_limit_is_per_firehose(smtp_server: SmtpServer) -> None:
    alerts = Alerts(config(smtp_server.address, every="1h"))
    alerts.failing(TO, incident("one_fh"))
    alerts.failing(TO, incident("two_fh"))
    await alerts.close()
    subjects = sorted(r.message["Subject"] for r in smtp_server.inbox.received)
    assert [s.split()[2] for s in subjects] == ["one_fh", "two_fh"]


async def test_another_failure_mail_after_every(smtp_server: SmtpServer) -> None:
    """The worker reports every attempt (here every 20 ms); mails go out once per 200 ms."""
    every = 0.2
    alerts = Alerts(config(smtp_server.address, every="200ms"))
    start = time.monotonic()
    calls = 0
    deadline = start + 10
    while len(smtp_server.inbox.received) < 2 and time.monotonic() < deadline:
        alerts.failing(TO, incident("every_fh"))
        calls += 1
        await asyncio.sleep(0.02)
    last_call = time.monotonic() - start
    await alerts.close()

    mails = len(smtp_server.inbox.received)
    assert mails >= 2
    assert last_call >= every  # the second mail could not go before the period ended
    assert mails <= 1 + math.floor(last_call / every)
    assert calls > mails


async def test_recovery_mail_once_after_failure_mail(smtp_server: SmtpServer) -> None:
    alerts = Alerts(config(smtp_server.address, every="1h"))
    alerts.failing(TO, incident("flap_fh"))
    await smtp_server.inbox.wait_for(1)
    recovered = incident("flap_fh")
    alerts.recovered(TO, recovered)
    alerts.recovered(TO, recovered)
    await alerts.close()

    [_, recovery] = smtp_server.inbox.received
    assert recovery.message["Subject"] == "[firehosed] firehose flap_fh recovered"
    body = recovery.message.get_content()
    assert "partner_sftp" in body and "2025-11-23T10:58:00Z" in body
    assert "Last error:" in body
    assert sent("flap_fh", "recovered") == 1


async def test_recovery_follows_a_failure_mail_still_in_flight() -> None:
    with running_smtp(Inbox(delay=0.3)) as server:
        alerts = Alerts(config(server.address, every="1h"))
        alerts.failing(TO, incident("inflight_fh"))
        alerts.recovered(TO, incident("inflight_fh"))
        await alerts.close()
    subjects = [r.message["Subject"] for r in server.inbox.received]
    assert [s.split()[3] for s in subjects] == ["failing:", "recovered"]


async def test_no_recovery_mail_without_failure_mail(smtp_server: SmtpServer) -> None:
    alerts = Alerts(config(smtp_server.address))
    alerts.recovered(TO, incident("fine_fh"))
    alerts.failing(None, incident("unmailed_fh"))
    alerts.recovered(TO, incident("unmailed_fh"))
    await alerts.close()
    assert smtp_server.inbox.received == []


async def test_no_recovery_mail_when_failure_mail_was_not_accepted(
    smtp_server: SmtpServer,
) -> None:
    alerts = Alerts(config(f"127.0.0.1:{free_port()}"))
    alerts.failing(TO, incident("lost_fh"))
    await asyncio.sleep(0)  # the failure mail starts against the old server
    alerts.reconfigure(config(smtp_server.address))
    alerts.recovered(TO, incident("lost_fh"))
    await alerts.close()
    assert smtp_server.inbox.received == []
    assert sent("lost_fh", "recovered") == 0


async def test_reconfigure_applies_to_next_mail(smtp_server: SmtpServer) -> None:
    alerts = Alerts(config(f"127.0.0.1:{free_port()}", every="1h"))
    alerts.reconfigure(config(smtp_server.address, every="1h", **{"from": "new@example.net"}))
    alerts.failing(TO, incident("reload_fh"))
    [mail] = await smtp_server.inbox.wait_for(1)
    await alerts.close()
    assert mail.message["From"] == "new@example.net"


async def test_dead_letter_is_never_rate_limited(smtp_server: SmtpServer) -> None:
    alerts = Alerts(config(smtp_server.address, every="1h"))
    alerts.failing(TO, incident("dead_fh"))
    alerts.dead_lettered(TO, incident("dead_fh"), "firehose-2025-11-23-10-55-00-000000.csv")
    alerts.dead_lettered(TO, incident("dead_fh"), "firehose-2025-11-23-11-00-00-000000.csv")
    await alerts.close()
    subjects = sorted(r.message["Subject"] for r in smtp_server.inbox.received)
    assert subjects == [
        "[firehosed] firehose dead_fh dead-lettered batch firehose-2025-11-23-10-55-00-000000.csv",
        "[firehosed] firehose dead_fh dead-lettered batch firehose-2025-11-23-11-00-00-000000.csv",
        "[firehosed] firehose dead_fh failing: Connection refused (sftp.example.com:22)",
    ]
    assert sent("dead_fh", "dead_letter") == 2


async def test_no_recipient_logs_but_mails_nothing(smtp_server: SmtpServer, logs: Logs) -> None:
    alerts = Alerts(config(smtp_server.address))
    alerts.failing(None, incident("nobody_fh"))
    alerts.dead_lettered(None, incident("nobody_fh"), "batch.json")
    await alerts.close()
    assert smtp_server.inbox.received == []
    events = [(e["event"], e["firehose"]) for e in logs]
    assert ("alert.failing", "nobody_fh") in events
    assert ("alert.dead_letter", "nobody_fh") in events
    assert sent("nobody_fh", "failing") == 0


async def test_smtp_down_is_logged_and_counted(logs: Logs) -> None:
    before = failed()
    alerts = Alerts(config(f"127.0.0.1:{free_port()}"))
    alerts.failing(TO, incident("down_fh"))  # never raises
    await alerts.close()
    assert failed() == before + 1
    [failure] = [e for e in logs if e["event"] == "alert.failed"]
    assert failure["firehose"] == "down_fh"
    assert failure["error"] in {"SMTPConnectError", "ConnectionRefusedError"}


async def test_slow_smtp_server_times_out() -> None:
    before = failed()
    with running_smtp(Inbox(delay=10)) as server:
        alerts = Alerts(config(server.address, timeout="200ms"))
        start = time.monotonic()
        alerts.failing(TO, incident("slow_fh"))
        await alerts.close(timeout=5)
        assert time.monotonic() - start < 3
    assert failed() == before + 1
    assert sent("slow_fh", "failing") == 0


async def test_starttls_and_login(tls_smtp_server: SmtpServer) -> None:
    alerts = Alerts(
        config(tls_smtp_server.address, starttls=True, username=USERNAME, password=PASSWORD)
    )
    alerts.failing(TO, incident("tls_fh"))
    [mail] = await tls_smtp_server.inbox.wait_for(1)
    await alerts.close()
    assert mail.tls
    assert mail.login == USERNAME


async def test_wrong_password_is_logged_without_the_secret(
    tls_smtp_server: SmtpServer, logs: Logs
) -> None:
    before = failed()
    wrong = "not-the-Pa55word"
    alerts = Alerts(
        config(tls_smtp_server.address, starttls=True, username=USERNAME, password=wrong)
    )
    alerts.failing(TO, incident("auth_fh"))
    await alerts.close()
    assert tls_smtp_server.inbox.received == []
    assert failed() == before + 1
    [failure] = [e for e in logs if e["event"] == "alert.failed"]
    assert failure["error"] == "SMTPAuthenticationError"
    assert wrong not in repr(logs)


async def test_a_failed_tls_session_leaves_no_socket_open(
    tls_smtp_server: SmtpServer,
) -> None:
    """After a refused login over STARTTLS the connection is gone at once: a graceful TLS
    close would wait for the server's close_notify and could outlive the daemon's loop."""
    alerts = Alerts(
        config(tls_smtp_server.address, starttls=True, username=USERNAME, password="wrong")
    )
    alerts.failing(TO, incident("tls_leak_fh"))
    await alerts.close()
    await asyncio.sleep(0)  # one loop iteration: what a closing loop still gives
    assert sockets_to(int(tls_smtp_server.address.rpartition(":")[2])) == 0


def sockets_to(port: int) -> int:
    """This process's open TCP sockets connected to 127.0.0.1:`port` (Linux /proc)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd, gone by now
            ours.add(os.readlink(f"/proc/self/fd/{fd}"))
    count = 0
    with open("/proc/net/tcp") as table:
        for row in list(table)[1:]:
            fields = row.split()
            remote_port = int(fields[2].rpartition(":")[2], 16)
            if remote_port == port and f"socket:[{fields[9]}]" in ours:
                count += 1
    return count


async def test_close_waits_for_mail_in_flight() -> None:
    with running_smtp(Inbox(delay=0.5)) as server:
        alerts = Alerts(config(server.address))
        alerts.failing(TO, incident("flight_fh"))
        await alerts.close(timeout=5)
        assert len(server.inbox.received) == 1
    assert sent("flight_fh", "failing") == 1


async def test_close_is_bounded(logs: Logs) -> None:
    before = failed()
    with running_smtp(Inbox(delay=30)) as server:
        alerts = Alerts(config(server.address, timeout="60s"))
        alerts.failing(TO, incident("stuck_fh"))
        start = time.monotonic()
        await alerts.close(timeout=0.2)
        assert time.monotonic() - start < 2
    assert server.inbox.received == []
    assert failed() == before + 1
    [closed] = [e for e in logs if e["event"] == "alerts.closed"]
    assert closed["abandoned"] == 1


async def test_alerts_after_close_are_not_sent(smtp_server: SmtpServer) -> None:
    alerts = Alerts(config(smtp_server.address))
    await alerts.close()
    alerts.failing(TO, incident("late_fh"))
    assert smtp_server.inbox.received == []


async def test_invalid_recipient_never_reaches_the_caller(smtp_server: SmtpServer) -> None:
    before = failed()
    alerts = Alerts(config(smtp_server.address))
    alerts.failing("ops@acme.example\r\nBcc: someone@evil.example", incident("inject_fh"))
    await alerts.close()
    assert smtp_server.inbox.received == []
    assert failed() == before + 1


def test_subject_keeps_first_line_of_a_long_error() -> None:
    error = "550 " + "x" * 200 + "\nsecond line"
    message = compose(config("localhost:25"), "host", TO, "failing", incident("s", error))
    subject = message["Subject"]
    assert "second line" not in subject
    assert subject.endswith("…")
    assert "second line" in message.get_content()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45, "45s"), (750, "12m 30s"), (3600, "1h"), (3725, "1h 2m"), (90061, "1d 1h")],
)
def test_human_age(seconds: float, text: str) -> None:
    assert human_age(seconds) == text


@pytest.mark.parametrize(
    ("value", "address"),
    [("mail:587", ("mail", 587)), ("[::1]:25", ("::1", 25)), ("mail", ("mail", 25))],
)
def test_smtp_address(value: str, address: tuple[str, int]) -> None:
    assert smtp_address(value) == address


@pytest.mark.parametrize("value", ["::1", "mail:0", "mail:99999", "", "a b:25"])
def test_smtp_address_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        smtp_address(value)
