"""File channels as import sources (`list_files`, `fetch`), one contract for every kind,
each run against a real server: a local directory, OpenSSH, vsftpd (FTPES, no MLSD),
pyftpdlib (plain FTP, MLSD) and moto (S3)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import msgspec
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession

from firehosed import fileio
from firehosed.channels import config_type, open_channel
from firehosed.channels.base import Channel, RemoteFile
from firehosed.errors import DeliveryError, SourceChanged
from firehosed.fileio import PACE
from firehosed.names import split_pattern
from firehosed.units import dec_hook
from tests.servers.ftp import (
    PASSWORD,
    USERNAME,
    PyftpdServer,
    ca,
    ca_pem,
    pyftpd_server,
    require_vsftpd,
    server_cert,
    vsftpd_server,
)
from tests.servers.moto import moto_server
from tests.servers.sftp import ClientKey, OpensshServer, openssh_server

# fixtures: imported so pytest finds them
__all__ = ["ca", "moto_server", "openssh_server", "server_cert"]

MiB = 1 << 20
ACCOUNT = "acme"
S3_PREFIX = "{account}/Firehose/"
CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}
# Modification times set on the server side (whole seconds: SFTP v3 and FTP carry no more).
EARLIER, LATER = 1_764_000_000, 1_764_000_600


@dataclass
class Place:
    """Where a source's files live: the channel config reaching them, and how a test
    puts a file there behind the channel's back (on disk, or straight into the bucket)."""

    kind: str
    config: dict[str, Any]
    root: Path | None = None  # the directory the server serves, on disk
    bucket: str = ""
    s3: Any = None  # a boto3 client on the moto server
    connections: Callable[[], int] | None = None  # logins the server has accepted
    mtimes: bool = True  # versions are modification times (else S3 ETags)

    def write(self, name: str, data: bytes, mtime: int = EARLIER) -> None:
        if self.s3 is not None:
            key = S3_PREFIX.format(account=ACCOUNT) + name
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
            return
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (mtime, mtime))

    def path(self, name: str) -> Path:
        assert self.root is not None
        return self.root / name


def _directory(tmp_path: Path) -> Place:
    root = tmp_path / "source"
    return Place("directory", {"path": str(root)}, root=root)


def _sftp(server: OpensshServer, tmp_path: Path) -> Place:
    root = tmp_path / "remote"
    root.mkdir()
    config = {
        "host": "127.0.0.1",
        "port": server.port,
        "username": server.username,
        "private_key": server.client_key.private,
        "known_hosts": server.known_hosts,
        "path": str(root),
        "connect_timeout": "5s",
    }
    return Place("sftp", config, root=root, connections=server.accepted_connections)


def _pyftpd(server: PyftpdServer) -> Place:
    config = {"host": "127.0.0.1", "port": server.port, "username": USERNAME}
    config |= {"password": PASSWORD, "path": "/", "connect_timeout": "5s", "timeout": "5s"}
    return Place("ftp", config, root=server.home, connections=lambda: server.connections)


def _s3(moto: str) -> Place:
    bucket = f"imports-{os.getpid()}-{time.monotonic_ns()}"
    client = boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=moto,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=bucket)
    config = {"bucket": bucket, "prefix": S3_PREFIX, "endpoint_url": moto, **CREDENTIALS}
    return Place("s3", config, bucket=bucket, s3=client, mtimes=False)


@pytest.fixture(params=["directory", "sftp", "ftpes", "ftp", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    """One source of each kind, on its real server (ftpes: vsftpd; ftp: pyftpdlib)."""
    kind = request.param
    with ExitStack() as stack:
        if kind == "directory":
            yield _directory(tmp_path)
        elif kind == "sftp":
            yield _sftp(request.getfixturevalue("openssh_server"), tmp_path)
        elif kind == "ftpes":
            require_vsftpd()
            cert = request.getfixturevalue("server_cert")
            server = stack.enter_context(vsftpd_server(tmp_path / "vsftpd", cert))
            ca = ca_pem(request.getfixturevalue("ca"))
            config = {"host": "127.0.0.1", "port": server.port, "path": "/upload", "ca": ca}
            config |= {"connect_timeout": "5s", "timeout": "5s"}
            logins = lambda: server.log.read_text().count("OK LOGIN")  # noqa: E731
            yield Place("ftpes", config, root=server.upload, connections=logins)
        elif kind == "ftp":
            yield _pyftpd(stack.enter_context(pyftpd_server(tmp_path / "ftp-home")))
        else:
            s3 = _s3(request.getfixturevalue("moto_server"))
            stack.callback(s3.s3.close)
            yield s3


@pytest.fixture
async def channel(place: Place) -> AsyncIterator[Channel]:
    """The source channel for `place`, closed after the test."""
    opened = build(place)
    yield opened
    await opened.close()


def build(place: Place) -> Channel:
    """A source channel from `place`'s config, decoded as the config file's would be."""
    raw = {"type": place.kind, **place.config}
    return open_channel("source", msgspec.convert(raw, config_type(place.kind), dec_hook=dec_hook))


async def list_files(channel: Channel, pattern: str) -> list[RemoteFile]:
    return await channel.list_files(pattern, account=ACCOUNT)


# --- listing ------------------------------------------------------------------------------


async def test_lists_the_matching_files_of_one_directory_sorted(
    place: Place, channel: Channel
) -> None:
    for name, size in [
        ("heap/users-2026-12-03.csv", 30),
        ("heap/users-2026-12-01.csv", 10),
        ("heap/users-2026-12-02.csv", 0),
        ("heap/orders-2026-12-01.csv", 5),  # another name
        ("heap/.users-2026-12-04.csv.part", 7),  # a temp file being written
        ("heap/old/users-2026-11-30.csv", 3),  # in a subdirectory
        ("heap/users-folder.csv/inner.csv", 4),  # a directory whose name matches
        ("users-2026-12-01.csv", 6),  # at the root
    ]:
        place.write(name, os.urandom(size))

    assert await list_files(channel, "heap/users-*.csv") == [
        RemoteFile("heap/users-2026-12-01.csv", 10, ANY_VERSION),
        RemoteFile("heap/users-2026-12-02.csv", 0, ANY_VERSION),
        RemoteFile("heap/users-2026-12-03.csv", 30, ANY_VERSION),
    ]
    assert await names(channel, "heap/users-2026-12-0[13].csv") == [
        "heap/users-2026-12-01.csv",
        "heap/users-2026-12-03.csv",
    ]
    assert await names(channel, "heap/users-2026-12-0?.csv") == [
        "heap/users-2026-12-01.csv",
        "heap/users-2026-12-02.csv",
        "heap/users-2026-12-03.csv",
    ]
    assert await names(channel, "heap/orders-2026-12-01.csv") == ["heap/orders-2026-12-01.csv"]
    assert await names(channel, "users-*.csv") == ["users-2026-12-01.csv"]
    assert await names(channel, "heap/old/*") == ["heap/old/users-2026-11-30.csv"]
    assert await names(channel, "heap/Users-*.csv") == []  # case matters


async def test_a_missing_directory_lists_as_no_files(place: Place, channel: Channel) -> None:
    place.write("heap/users-2026-12-01.csv", b"a,b\n")
    assert await list_files(channel, "nowhere/users-*.csv") == []
    assert await list_files(channel, "heap/nowhere/users-*.csv") == []
    # The source still answers afterwards (an FTP server's 550 did not break anything).
    assert await names(channel, "heap/*.csv") == ["heap/users-2026-12-01.csv"]


async def test_version_changes_when_the_content_does(place: Place, channel: Channel) -> None:
    name = "heap/users-2026-12-01.csv"
    place.write(name, b"id,email\n1,a@example.com\n", mtime=EARLIER)
    [first] = await list_files(channel, "heap/users-*.csv")
    assert await list_files(channel, "heap/users-*.csv") == [first]  # stable while unchanged

    rewritten = b"id,email\n2,b@example.com\n"  # the same size, other bytes
    place.write(name, rewritten, mtime=LATER)
    [second] = await list_files(channel, "heap/users-*.csv")
    assert second.size == first.size
    assert second.version != first.version
    if place.kind == "directory":
        assert second.version == str(LATER * 10**9)  # nanoseconds
    elif place.mtimes:
        assert (first.version, second.version) == (str(EARLIER), str(LATER))  # seconds
    else:
        assert second.version == hashlib.md5(rewritten).hexdigest()  # the ETag


@pytest.mark.parametrize("place", ["directory", "sftp"], indirect=True)
async def test_symbolic_links_are_not_listed(place: Place, channel: Channel) -> None:
    # Only where the protocol tells links from files (FTP without MLSD, vsftpd's case,
    # cannot: SIZE follows a link).
    place.write("heap/users-2026-12-01.csv", b"a\n")
    place.path("heap/users-link.csv").symlink_to("users-2026-12-01.csv")
    assert await names(channel, "heap/users-*.csv") == ["heap/users-2026-12-01.csv"]


@pytest.mark.parametrize("place", ["sftp", "ftpes", "ftp", "s3"], indirect=True)
async def test_a_source_refusing_access_raises_a_delivery_error(place: Place) -> None:
    refusal = {
        "sftp": {"private_key": ClientKey.generate().private},  # a key sshd does not know
        "ftpes": {"username": "intruder", "password": "x"},  # vsftpd: anonymous only
        "ftp": {"password": "wrong"},
        "s3": {"bucket": "no-such-bucket"},
    }[place.kind]
    channel = build(Place(place.kind, {**place.config, **refusal}))
    try:
        with pytest.raises(DeliveryError) as raised:
            await list_files(channel, "heap/users-*.csv")
    finally:
        await channel.close()
    message = str(raised.value)
    assert place.kind in message
    assert "heap" in message  # the directory it tried to list
    assert ("no-such-bucket" if place.kind == "s3" else "127.0.0.1") in message


# --- fetching -----------------------------------------------------------------------------


async def test_fetch_copies_the_bytes_exactly(
    place: Place, channel: Channel, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB + 17)
    place.write("heap/users-2026-12-01.csv", data)
    target = tmp_path / "fetched.csv"
    target.write_bytes(b"older and longer" * MiB)  # truncated, not overwritten in place

    copied = await channel.fetch("heap/users-2026-12-01.csv", target, account=ACCOUNT)

    assert copied == len(data)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()


async def test_a_large_fetch_is_written_out_as_it_comes(
    place: Place, channel: Channel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetched file is written out PACE bytes at a time, not left whole to its last
    fsync, which would hold every other fsync of the disk (a POST's) behind it."""
    data = os.urandom(3 * PACE + 17)
    place.write("big.csv", data)
    target = tmp_path / "big-fetched.csv"
    ranges: list[tuple[int, int]] = []  # (start, end) of each range of it written out
    real = fileio.write_out

    def write_out(fd: int, start: int, length: int, *, wait: bool) -> None:  # watched
        if os.readlink(f"/proc/self/fd/{fd}") == str(target):
            ranges.append((start, start + length))
        real(fd, start, length, wait=wait)

    monkeypatch.setattr(fileio, "write_out", write_out)
    copied = await channel.fetch("big.csv", target, account=ACCOUNT)

    assert copied == len(data) and target.read_bytes() == data
    # asyncssh writes the file itself: one range at a time is written out beside it.
    assert len(ranges) >= (1 if place.kind == "sftp" else 3), ranges
    assert min(end for _, end in ranges) < len(data), "written out before the fetch's end"


async def test_fetching_a_missing_file_names_it(
    place: Place, channel: Channel, tmp_path: Path
) -> None:
    """A file gone since its listing is SourceChanged: the run lists again, and a file no
    longer listed becomes an error of the run, not a failed fetch of all its files."""
    place.write("heap/users-2026-12-01.csv", b"a\n")
    with pytest.raises(SourceChanged) as raised:
        await channel.fetch("heap/users-2026-12-09.csv", tmp_path / "x.csv", account=ACCOUNT)
    message = str(raised.value)
    assert "heap/users-2026-12-09.csv" in message and "gone" in message
    assert place.kind in message
    # The channel recovers: the next fetch works.
    assert await channel.fetch("heap/users-2026-12-01.csv", tmp_path / "y.csv", account=ACCOUNT)
    assert (tmp_path / "y.csv").read_bytes() == b"a\n"


@pytest.mark.parametrize("place", ["sftp", "ftpes", "ftp"], indirect=True)
async def test_listing_and_fetching_share_one_connection(
    place: Place, channel: Channel, tmp_path: Path
) -> None:
    place.write("heap/users-2026-12-01.csv", b"a\n")
    place.write("heap/users-2026-12-02.csv", b"b\n")
    for file in await list_files(channel, "heap/users-*.csv"):
        await channel.fetch(file.name, tmp_path / "fetched", account=ACCOUNT)
    await list_files(channel, "heap/users-*.csv")
    assert place.connections is not None
    assert place.connections() == 1


# --- S3 specifics -------------------------------------------------------------------------


@pytest.mark.parametrize("place", ["s3"], indirect=True)
async def test_s3_lists_every_page(place: Place, channel: Channel, moto_server: str) -> None:
    prefix = S3_PREFIX.format(account=ACCOUNT)
    wanted = [f"heap/users-{n:05}.csv" for n in range(10_000)]
    others = ["heap/orders-00001.csv", "heap/users-00001.csv.gz", "heap/deeper/users-1.csv"]
    async with AioSession().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=moto_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=AioConfig(max_pool_connections=32),
    ) as s3:
        queue = iter(wanted + others)

        async def putter() -> None:
            for name in queue:
                await s3.put_object(Bucket=place.bucket, Key=prefix + name, Body=b"1,a\n")

        await asyncio.gather(*(putter() for _ in range(32)))

    listed = await list_files(channel, "heap/users-*.csv")

    assert [file.name for file in listed] == wanted  # 10 pages of 1000 keys, sorted
    assert {file.size for file in listed} == {4}


async def test_a_source_fetches_only_the_version_it_listed(
    place: Place, channel: Channel, tmp_path: Path
) -> None:
    """A file overwritten between its listing and its fetch, at the same size, is not
    fetched under the listed version (its rows' ids hold it): SourceChanged, and the run
    lists it again. S3 refuses the listed ETag (If-Match); the others find another
    modification time once the file is copied."""
    place.write("heap/users-2026-12-01.csv", b"a\n")
    [listed] = await list_files(channel, "heap/users-*.csv")
    # the same size, another ETag or modification time
    place.write("heap/users-2026-12-01.csv", b"b\n", mtime=EARLIER + 60)
    target = tmp_path / "fetched.csv"

    with pytest.raises(SourceChanged, match=r"users-2026-12-01\.csv: changed since"):
        await channel.fetch(listed.name, target, account=ACCOUNT, version=listed.version)

    [now] = await list_files(channel, "heap/users-*.csv")
    assert now.version != listed.version
    assert await channel.fetch(now.name, target, account=ACCOUNT, version=now.version) == 2
    assert target.read_bytes() == b"b\n"


@pytest.mark.parametrize("place", ["s3"], indirect=True)
async def test_s3_prefix_names_the_account(place: Place, channel: Channel) -> None:
    place.write("users-1.csv", b"a\n")  # under "acme/Firehose/"
    assert await names(channel, "users-*.csv") == ["users-1.csv"]
    assert await channel.list_files("users-*.csv", account="other") == []
    with pytest.raises(DeliveryError, match="names an account"):
        await channel.list_files("users-*.csv", account="")


# --- patterns, and channels that are no source ----------------------------------------------


def test_split_pattern() -> None:
    assert split_pattern("heap/users-*.csv") == ("heap", "users-*.csv")
    assert split_pattern("users-2026-12-03.csv") == ("", "users-2026-12-03.csv")
    assert split_pattern("a/b/users-[0-9].csv") == ("a/b", "users-[0-9].csv")
    for pattern, reason in [
        ("*/x.csv", "only the file name may hold glob characters"),
        ("heap[1]/x.csv", "only the file name may hold glob characters"),
        ("/abs/x.csv", "relative"),
        ("a/../b.csv", "'..'"),
        ("", "empty"),
        ("heap/", "empty"),
        ("a//b.csv", "empty"),
        ("./b.csv", "'.'"),
    ]:
        with pytest.raises(ValueError, match=reason):
            split_pattern(pattern)


async def test_a_stream_channel_is_no_source(tmp_path: Path) -> None:
    config = msgspec.convert(
        {"type": "webhook", "url": "http://127.0.0.1:9/"}, config_type("webhook"), dec_hook=dec_hook
    )
    channel = open_channel("hooks", config)
    try:
        with pytest.raises(DeliveryError, match="a webhook channel cannot be an import source"):
            await channel.list_files("x.csv", account=ACCOUNT)
        with pytest.raises(DeliveryError, match="cannot be an import source") as raised:
            await channel.fetch("x.csv", tmp_path / "x", account=ACCOUNT)
        assert not raised.value.retryable
    finally:
        await channel.close()


async def names(channel: Channel, pattern: str) -> list[str]:
    return [file.name for file in await list_files(channel, pattern)]


class _AnyVersion(str):
    """Equal to any version: the listing test checks names and sizes, versions elsewhere."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str)

    def __hash__(self) -> int:
        return 0


ANY_VERSION = _AnyVersion()
