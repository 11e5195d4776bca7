"""The ftp and ftpes channels against real FTP servers: pyftpdlib and vsftpd."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trustme

from firehosed.channels.ftp import FtpChannel, FtpConfig, FtpesConfig
from firehosed.errors import DeliveryError
from firehosed.units import dec_hook
from tests.channels.batches import make_batch
from tests.servers.ftp import (
    PASSWORD,
    READER,
    READER_PASSWORD,
    USERNAME,
    PyftpdServer,
    ServerCert,
    VsftpdServer,
    ca,
    ca_pem,
    free_port,
    pyftpd_server,
    require_vsftpd,
    server_cert,
    vsftpd_server,
)

__all__ = ["ca", "server_cert"]  # fixtures: imported so pytest finds them

NAME = "acme/Firehose/firehose-2024-05-01-10-00-00-000000.json"

Build = Callable[..., FtpChannel]


def remote_files(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256), `.part` files included."""
    return {
        str(p.relative_to(root)): sha(p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll an observable condition until it holds or the deadline passes."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
def plain_server(tmp_path: Path) -> Iterator[PyftpdServer]:
    with pyftpd_server(tmp_path / "ftp-home") as server:
        yield server


@pytest.fixture
def tls_server(tmp_path: Path, server_cert: ServerCert) -> Iterator[PyftpdServer]:
    with pyftpd_server(tmp_path / "ftps-home", server_cert) as server:
        yield server


@pytest.fixture
def vsftpd(tmp_path: Path, server_cert: ServerCert) -> Iterator[VsftpdServer]:
    require_vsftpd()
    with vsftpd_server(tmp_path / "vsftpd", server_cert) as server:
        yield server


@pytest.fixture
async def build() -> AsyncIterator[Build]:
    """Builds channels from config keys and closes every one of them after the test."""
    opened: list[FtpChannel] = []

    def make(kind: str, **keys: Any) -> FtpChannel:
        config = msgspec.convert(
            {"type": kind, "host": "127.0.0.1", "connect_timeout": "5s", "timeout": "5s", **keys},
            FtpConfig | FtpesConfig,
            dec_hook=dec_hook,
        )
        channel = FtpChannel(f"test-{kind}", config)
        opened.append(channel)
        return channel

    yield make
    for channel in opened:
        await channel.close()


def login(server: PyftpdServer | VsftpdServer) -> dict[str, Any]:
    if isinstance(server, VsftpdServer):
        return {"port": server.port, "path": "/upload"}
    return {"port": server.port, "username": USERNAME, "password": PASSWORD}


async def test_ftp_upload(plain_server: PyftpdServer, build: Build, tmp_path: Path) -> None:
    channel = build("ftp", **login(plain_server), path="/incoming")
    data = b'[{"type":"pd"}]\n'
    await channel.put(make_batch(tmp_path, "firehose-1.json", data))
    assert remote_files(plain_server.home) == {"incoming/firehose-1.json": sha(data)}


async def test_ftpes_upload_to_pyftpdlib(
    tls_server: PyftpdServer, build: Build, tmp_path: Path, ca: trustme.CA
) -> None:
    channel = build("ftpes", **login(tls_server), ca=ca_pem(ca), path="/in")
    data = os.urandom(3 << 20)  # several blocks
    await channel.put(make_batch(tmp_path, NAME, data))
    assert remote_files(tls_server.home) == {f"in/{NAME}": sha(data)}
    # TLS before the credentials; data protection on (the server requires both anyway).
    commands = tls_server.commands
    assert commands.index("AUTH") < commands.index("USER") < commands.index("PASS")
    assert {"PBSZ", "PROT"} <= set(commands)


async def test_ftpes_upload_to_vsftpd_resumes_tls_session(
    vsftpd: VsftpdServer, build: Build, tmp_path: Path, ca: trustme.CA
) -> None:
    # vsftpd's require_ssl_reuse=YES refuses (522) any data connection that does not
    # resume the control connection's session, so each upload succeeding proves reuse.
    channel = build("ftpes", **login(vsftpd), ca=ca_pem(ca))
    first, second = os.urandom(2 << 20), b'{"type":"t"}\n'
    await channel.put(make_batch(tmp_path, NAME, first))
    await channel.put(make_batch(tmp_path, "acme/other/second.ndjson", second))
    second_name = "acme/other/second.ndjson"
    assert remote_files(vsftpd.upload) == {NAME: sha(first), second_name: sha(second)}
    log = vsftpd.log.read_text()
    assert log.count("OK UPLOAD") == 2
    assert log.count(", reused, ") == 2  # vsftpd's debug_ssl line for each data connection


async def test_nested_directories_created(
    plain_server: PyftpdServer, build: Build, tmp_path: Path
) -> None:
    channel = build("ftp", **login(plain_server), path="/deep/er")
    names = ["a/b/c/one.json", "a/b/two.json", "x/three.json"]
    for number, name in enumerate(names):
        await channel.put(make_batch(tmp_path, name, b"%d" % number))
    assert remote_files(plain_server.home) == {
        f"deep/er/{name}": sha(b"%d" % number) for number, name in enumerate(names)
    }


async def test_same_batch_twice_leaves_one_file(
    plain_server: PyftpdServer, build: Build, tmp_path: Path
) -> None:
    batch = make_batch(tmp_path, NAME, b"same bytes every time")
    await build("ftp", **login(plain_server)).put(batch)
    await build("ftp", **login(plain_server)).put(batch)  # a retry after a restart
    assert remote_files(plain_server.home) == {NAME: sha(b"same bytes every time")}


async def test_replaces_file_when_server_refuses_to_rename_onto_it(
    tmp_path: Path, build: Build
) -> None:
    with pyftpd_server(tmp_path / "home", refuse_overwrite=True) as server:
        channel = build("ftp", **login(server))
        batch = make_batch(tmp_path, NAME, b"same bytes every time")
        await channel.put(batch)
        await channel.put(batch)
        assert remote_files(server.home) == {NAME: sha(b"same bytes every time")}
        assert server.commands.count("DELE") == 1


async def test_truncated_upload_is_not_published(tmp_path: Path, build: Build) -> None:
    with pyftpd_server(tmp_path / "home", lose_last_byte=True) as server:
        channel = build("ftp", **login(server))
        with pytest.raises(DeliveryError, match="holds 9 of 10 bytes sent"):
            await channel.put(make_batch(tmp_path, "cut.json", b"0123456789"))
        assert list(remote_files(server.home)) == [".cut.json.part"]


async def test_ftpes_refuses_certificate_from_another_ca(
    tls_server: PyftpdServer, build: Build, tmp_path: Path
) -> None:
    channel = build("ftpes", **login(tls_server), ca=ca_pem(trustme.CA()))
    with pytest.raises(DeliveryError, match=r"TLS certificate for 127\.0\.0\.1 not trusted"):
        await channel.put(make_batch(tmp_path, NAME, b"secret"))
    assert tls_server.commands == ["AUTH"]  # no USER, no PASS, no fallback to clear text
    assert remote_files(tls_server.home) == {}


async def test_ftpes_refuses_server_without_tls(
    plain_server: PyftpdServer, build: Build, tmp_path: Path, ca: trustme.CA
) -> None:
    channel = build("ftpes", **login(plain_server), ca=ca_pem(ca))
    with pytest.raises(DeliveryError, match="refused AUTH TLS"):
        await channel.put(make_batch(tmp_path, NAME, b"secret"))
    assert plain_server.commands == ["AUTH"]
    assert remote_files(plain_server.home) == {}


async def test_ftpes_checks_certificate_name(
    tls_server: PyftpdServer, build: Build, ca: trustme.CA
) -> None:
    channel = build("ftpes", **login(tls_server), ca=ca_pem(ca), server_hostname="ftp.example.com")
    with pytest.raises(DeliveryError, match="not trusted"):
        await channel.check()
    trusted = build("ftpes", **login(tls_server), ca=ca_pem(ca), server_hostname="localhost")
    assert "is writable" in await trusted.check()


async def test_wrong_password(plain_server: PyftpdServer, build: Build, tmp_path: Path) -> None:
    channel = build("ftp", port=plain_server.port, username=USERNAME, password="wrong")
    with pytest.raises(DeliveryError, match="530"):
        await channel.put(make_batch(tmp_path, NAME, b"x"))
    with pytest.raises(DeliveryError, match="530"):
        await channel.check()
    assert remote_files(plain_server.home) == {}


async def test_check_ok(tls_server: PyftpdServer, build: Build, ca: trustme.CA) -> None:
    channel = build("ftpes", **login(tls_server), ca=ca_pem(ca), path="/incoming/firehose")
    summary = await channel.check()
    assert summary == (
        f"ftpes {USERNAME}@127.0.0.1:{tls_server.port} path /incoming/firehose is writable"
    )
    assert (tls_server.home / "incoming" / "firehose").is_dir()
    assert remote_files(tls_server.home) == {}  # the probe was deleted
    assert {"STOR", "DELE"} <= set(tls_server.commands)


async def test_check_ok_on_vsftpd(vsftpd: VsftpdServer, build: Build, ca: trustme.CA) -> None:
    channel = build("ftpes", **login(vsftpd), ca=ca_pem(ca))
    assert "is writable" in await channel.check()
    assert remote_files(vsftpd.upload) == {}


async def test_check_fails_without_write_access(plain_server: PyftpdServer, build: Build) -> None:
    channel = build("ftp", port=plain_server.port, username=READER, password=READER_PASSWORD)
    with pytest.raises(DeliveryError, match="server answered 550"):
        await channel.check()
    assert remote_files(plain_server.home) == {}


async def test_check_fails_when_nothing_listens(build: Build) -> None:
    channel = build("ftp", port=free_port())
    with pytest.raises(DeliveryError, match=r"Connect call failed|refused"):
        await channel.check()


async def test_silent_server_times_out(build: Build) -> None:
    # A fake: a socket that accepts connections (kernel backlog) but never says hello.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        channel = build("ftp", port=silent.getsockname()[1], connect_timeout="300ms")
        started = time.monotonic()
        with pytest.raises(DeliveryError, match="timed out"):
            await channel.check()
        assert time.monotonic() - started < 3


async def test_connection_reused_across_batches(
    plain_server: PyftpdServer, build: Build, tmp_path: Path
) -> None:
    channel = build("ftp", **login(plain_server))
    for number in range(3):
        await channel.put(make_batch(tmp_path, f"f{number}.json", b"%d" % number))
    assert plain_server.connections == 1
    assert plain_server.commands.count("USER") == 1
    await channel.close()
    assert plain_server.commands[-1] == "QUIT"
    await wait_until(lambda: plain_server.disconnections == 1)


async def test_reconnects_after_server_drops_idle_connection(
    tmp_path: Path, build: Build, server_cert: ServerCert, ca: trustme.CA
) -> None:
    with pyftpd_server(tmp_path / "home", server_cert, idle_timeout=1.0) as server:
        channel = build("ftpes", **login(server), ca=ca_pem(ca))
        await channel.put(make_batch(tmp_path, "one.json", b"1"))
        await wait_until(lambda: server.disconnections == 1)  # "421 timed out", hung up
        await channel.put(make_batch(tmp_path, "two.json", b"2"))
        assert server.connections == 2
        assert remote_files(server.home) == {"one.json": sha(b"1"), "two.json": sha(b"2")}


async def test_reconnects_after_failure(
    plain_server: PyftpdServer, build: Build, tmp_path: Path
) -> None:
    channel = build("ftp", **login(plain_server))
    with pytest.raises(DeliveryError):
        await channel.put(make_batch(tmp_path, "bad\r\nDELE x.json", b"x"))
    await channel.put(make_batch(tmp_path, "good.json", b"ok"))
    assert remote_files(plain_server.home) == {"good.json": sha(b"ok")}
    assert "DELE" not in plain_server.commands  # the line break was never sent


def test_config_defaults_and_problems() -> None:
    config = msgspec.convert({"type": "ftpes", "host": "ftp.example.com"}, FtpesConfig)
    assert (config.port, config.username, config.path) == (21, "anonymous", "/")
    assert (config.connect_timeout, config.timeout) == (10.0, 60.0)
    assert config.problems() == []
    bad = FtpesConfig(host="", port=0, ca="not a certificate", ca_file="/etc/ca.pem")
    keys = [key for key, _ in bad.problems()]
    assert keys == ["host", "port", "ca_file"]
    with pytest.raises(msgspec.ValidationError, match="ca"):
        msgspec.convert({"type": "ftp", "host": "h", "ca": "x"}, FtpConfig)
