"""The daily archive firehose, end to end: a real daemon whose clock is moved past
midnight by Debian's `faketime` (wall clock only: its event loop's monotonic clock is
left alone), posting signals on both sides of midnight and reading the zip the directory
channel receives. Every CSV cell is checked against the posted signals.

Under CI=true a missing libfaketime fails the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

import csv
import io
import os
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest

from tests.daemon import Daemon, signal_record, wait_until
from tests.servers.moto import moto_server
from tests.servers.sftp import OpensshServer, openssh_server
from tests.servers.smtp import SmtpServer, smtp_server

LIBFAKETIME = next(
    (
        path
        for path in (
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/faketime/libfaketime.so.1",
        )
        if Path(path).exists()
    ),
    None,
)
if LIBFAKETIME is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("libfaketime is missing: apt-get install faketime (scripts/test does)")
    pytestmark = pytest.mark.skip(reason="libfaketime not installed (apt-get install faketime)")

__all__ = ["moto_server", "openssh_server", "smtp_server"]  # fixtures, for pytest

SPEED = 10  # fake seconds per real second
ARCHIVE = """
[firehoses.daily]
account = "acme"
channel = "local"
format = "zip-csv"
schedule = "daily"
timezone = "Asia/Kolkata"
archive_name = "{account}_%d%m%Y"
event_names = { c = "add to cart", t = "product purchase" }
"""


def faked(start_utc: str) -> dict[str, str]:
    """The environment of a daemon whose wall clock starts at `start_utc` and runs SPEED
    times as fast."""
    assert LIBFAKETIME is not None
    return {
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME": f"@{start_utc} x{SPEED}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "TZ": "UTC",
    }


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, ARCHIVE)
    yield d
    d.close()


def archive_rows(path: Path) -> dict[str, list[dict[str, str]]]:
    """Each CSV of the zip at `path` as rows keyed by header."""
    tables = {}
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        for name in archive.namelist():
            text = archive.read(name).decode("utf-8")
            tables[name] = list(csv.DictReader(io.StringIO(text, newline="")))
    return tables


def zips(daemon: Daemon) -> list[Path]:
    return sorted(daemon.files("**/*.zip"))


def test_midnight_cuts_the_day_into_one_zip_and_a_missed_midnight_is_built_on_start(
    daemon: Daemon,
) -> None:
    # 23:59:00 in Kolkata; midnight comes 6 s (real) after the process starts.
    started = time.monotonic()
    daemon.start(env=faked("2026-12-04 18:29:00"))
    carts = [
        signal_record(n, kind="c", session=f"s{n}", cart={"p": [{"prid": f"p{n}"}]})
        for n in range(30)
    ]
    buys = [signal_record(100 + n, kind="t", session=f"s{n}", total=n + 0.5) for n in range(5)]
    assert daemon.post(carts + buys).status_code == 202
    assert time.monotonic() - started < 5, "posted too late: the test needs them before midnight"
    wait_until(lambda: time.monotonic() - started > 6.5, timeout=10)
    later = [signal_record(200 + n, kind="c", session="late") for n in range(7)]
    assert daemon.post(later).status_code == 202
    (first,) = wait_until(lambda: zips(daemon), timeout=20)
    assert first.name == "acme_04122026.zip"
    tables = archive_rows(first)
    assert sorted(tables) == ["add to cart_04122026.csv", "product purchase_04122026.csv"]
    cart_rows = tables["add to cart_04122026.csv"]
    assert [row["id"] for row in cart_rows] == [f"{n:024x}" for n in range(30)]
    for n, row in enumerate(cart_rows):
        assert row["type"] == "c" and row["session"] == f"s{n}"
        assert row["Payload.cart.p.0.prid"] == f"p{n}"
        assert "Payload.evdt.$date" not in row and row["time"] == "2026-11-23T10:00:00Z"
    assert [row["Payload.total"] for row in tables["product purchase_04122026.csv"]] == [
        str(n + 0.5) for n in range(5)
    ]
    status = daemon.status()["firehoses"]["daily"]["archive"]
    assert status["last_day_delivered"] == "2026-12-04"
    # The status page and `firehosed status` say the same: the open day, the last one.
    wait_until(lambda: daemon.status()["firehoses"]["daily"]["archive"]["open_records"] == 7)
    days = "open day 2026-12-05: 7 records so far; 2026-12-04 delivered at 2026-12-0"
    assert days in daemon.admin("/").text
    table = daemon.cli("status")
    assert table.returncode == 0 and f"daily archives:\n  daily: {days}" in table.stdout

    # By hand: a delivered day is sent again only with --force, a running day never.
    kept = first.read_bytes()
    again = daemon.cli("archive", "--day", "2026-12-04", "daily")
    assert again.returncode == 1 and "--force sends it again" in again.stderr
    first.unlink()
    forced = daemon.cli("archive", "--day", "2026-12-04", "--force", "daily")
    assert forced.returncode == 0, forced.stderr
    assert "delivering acme_04122026.zip (35 records" in forced.stdout
    assert forced.stdout.rstrip().endswith("delivered acme_04122026.zip")
    assert first.read_bytes() == kept
    running = daemon.cli("archive", "--day", "2026-12-05", "daily")
    assert running.returncode == 1 and "has not ended in Asia/Kolkata" in running.stderr
    daemon.stop()

    # Down over the next midnight: on start (6 Dec, 00:05 in Kolkata) the 5th is built.
    daemon.start(env=faked("2026-12-05 18:35:00"))
    second = wait_until(lambda: [p for p in zips(daemon) if p != first], timeout=20)
    assert [p.name for p in second] == ["acme_05122026.zip"]
    (late_rows,) = archive_rows(second[0]).values()
    assert [row["id"] for row in late_rows] == [f"{200 + n:024x}" for n in range(7)]


def test_by_hand_with_the_daemon_stopped_builds_on_disk_when_every_record_is_spilled(
    daemon: Daemon,
) -> None:
    late_evening = faked("2026-12-04 16:30:00")  # 22:00 in Kolkata
    next_morning = faked("2026-12-04 19:30:00")  # 01:00 on the 5th
    daemon.start(env=late_evening)
    carts = [signal_record(n, kind="c", session=f"s{n}") for n in range(20)]
    assert daemon.post(carts).status_code == 202
    daemon.kill()  # before the queue's first cut (a minute): nothing spilled yet
    queued = daemon.cli("archive", "--day", "2026-12-04", "daily", env=next_morning)
    assert queued.returncode == 1
    assert "20 records are queued, not yet spilled" in queued.stderr, queued.stderr
    assert not zips(daemon)

    daemon.start(env=late_evening)
    daemon.stop()  # a worker spills all that is queued when it starts
    done = daemon.cli("archive", "--day", "2026-12-04", "daily", env=next_morning)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "archive daily 2026-12-04: the daemon is not running: building on disk",
        "archive daily 2026-12-04: building...",
        "archive daily 2026-12-04: delivering acme_04122026.zip (20 records, "
        f"{zips(daemon)[0].stat().st_size:,} bytes)",
        "archive daily 2026-12-04: delivered acme_04122026.zip",
    ]
    (built,) = zips(daemon)
    (rows,) = archive_rows(built).values()
    assert [row["id"] for row in rows] == [f"{n:024x}" for n in range(20)]
    again = daemon.cli("archive", "--day", "2026-12-04", "daily", env=next_morning)
    assert again.returncode == 1 and "--force sends it again" in again.stderr
    # The daemon, started after the delivery, knows the day was delivered.
    daemon.start(env=next_morning)
    status = daemon.status()["firehoses"]["daily"]["archive"]
    assert status["last_day_delivered"] == "2026-12-04"
    assert zips(daemon) == [built]


def test_an_archive_not_delivered_by_deliver_by_alerts_once_and_sets_the_metric(
    tmp_path: Path, smtp_server: SmtpServer
) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the channel wants a directory")
    extra = (
        ARCHIVE.replace('channel = "local"', 'channel = "blocked"')
        + f"""
deliver_by = "00:01"
error_alert_email = "ops@acme.example"
alert_after = "1h"

[channels.blocked]
type = "directory"
path = "{blocked}/export"

[alerts]
smtp = "{smtp_server.address}"
"""
    )
    daemon = Daemon(tmp_path, extra)
    try:
        # 23:59:30 in Kolkata: midnight 3 s (real) after start, deliver_by 9 s.
        daemon.start(env=faked("2026-12-04 18:29:30"))
        assert daemon.post([signal_record(n, kind="c") for n in range(3)]).status_code == 202
        wait_until(lambda: late_metric(daemon) == 1, timeout=30)
        [mail] = wait_until(lambda: smtp_server.inbox.received, timeout=10)
        subject = mail.message["Subject"]
        assert subject.startswith("[firehosed] firehose daily late: archive acme_04122026.zip")
        body = mail.message.get_content()
        assert "blocked" in body and "deliver_by" in body
        blocked.unlink()  # the channel works again: the next retry delivers
        wait_until(lambda: list((blocked / "export").glob("*.zip")), timeout=60)
        wait_until(lambda: late_metric(daemon) == 0, timeout=10)
        time.sleep(1.5 * 5)  # past a late check (ARCHIVE_CHECK): still one mail
        assert len(smtp_server.inbox.received) == 1
    finally:
        daemon.close()


def late_metric(daemon: Daemon) -> float:
    for line in daemon.admin("/metrics").text.splitlines():
        if line.startswith('firehosed_archive_late{firehose="daily"}'):
            return float(line.split()[-1])
    return -1.0


def sftp_channel(tmp_path: Path, server: OpensshServer) -> tuple[str, Callable[[], list[bytes]]]:
    key = tmp_path / "client_key"
    key.write_text(server.client_key.private)
    hosts = tmp_path / "known_hosts"
    hosts.write_text(server.known_hosts)
    remote = tmp_path / "remote"
    table = f"""
[channels.out]
type = "sftp"
host = "127.0.0.1"
port = {server.port}
username = "{server.username}"
private_key_file = "{key}"
known_hosts_file = "{hosts}"
path = "{remote}"
"""
    return table, lambda: [p.read_bytes() for p in sorted(remote.glob("**/*.zip"))]


def s3_channel(endpoint: str) -> tuple[str, Callable[[], list[bytes]]]:
    bucket = f"archive-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket=bucket)
    table = f"""
[channels.out]
type = "s3"
bucket = "{bucket}"
endpoint_url = "{endpoint}"
addressing_style = "path"
access_key_id = "testing"
secret_access_key = "testing"
"""

    def stored() -> list[bytes]:
        listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
        return [
            s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listed
            if o["Key"].endswith(".zip")
        ]

    return table, stored


@pytest.mark.parametrize("kind", ["sftp", "s3"])
def test_the_day_reaches_sftp_and_s3(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "sftp":
        table, stored = sftp_channel(tmp_path, request.getfixturevalue("openssh_server"))
    else:
        table, stored = s3_channel(request.getfixturevalue("moto_server"))
    extra = ARCHIVE.replace('channel = "local"', 'channel = "out"') + table
    daemon = Daemon(tmp_path, extra)
    try:
        started = time.monotonic()
        daemon.start(env=faked("2026-12-04 18:29:40"))  # midnight 2 s (real) after start
        posted = [signal_record(n, kind="t", session=f"s{n}", total=n) for n in range(40)]
        assert daemon.post(posted).status_code == 202
        assert time.monotonic() - started < 1.8, "posted too late: it must be before midnight"
        (data,) = wait_until(stored, timeout=30)
    finally:
        daemon.close()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == ["product purchase_04122026.csv"]
        text = archive.read("product purchase_04122026.csv").decode()
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [(r["id"], r["session"], r["Payload.total"]) for r in rows] == [
        (f"{n:024x}", f"s{n}", str(n)) for n in range(40)
    ]
