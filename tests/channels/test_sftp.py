"""The sftp channel against real SSH servers: asyncssh's SFTP server and OpenSSH sshd."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh
import msgspec
import pytest
import structlog

from firehosed.channels.sftp import SftpChannel, SftpConfig
from firehosed.errors import DeliveryError
from firehosed.units import dec_hook
from tests.channels.batches import make_batch
from tests.servers.sftp import (
    PASSWORD,
    USERNAME,
    AsyncsshSftpServer,
    OpensshServer,
    asyncssh_sftp_server,
    free_port,
    openssh_server,
)

__all__ = ["openssh_server"]  # a fixture: imported so pytest finds it

MiB = 1 << 20
NAME = "acme/Firehose/firehose-2024-05-01-10-00-00-000000.json"


def sftp_config(**keys: Any) -> SftpConfig:
    return msgspec.convert({"type": "sftp", **keys}, SftpConfig, dec_hook=dec_hook)


def remote_files(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256), `.part` files included."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def other_host_key_line(port: int) -> str:
    key = asyncssh.generate_private_key("ssh-ed25519")
    return f"[127.0.0.1]:{port} {key.export_public_key().decode().strip()}\n"


@pytest.fixture
async def channels() -> AsyncIterator[Callable[[SftpConfig], SftpChannel]]:
    """Builds channels and closes every one of them after the test."""
    opened: list[SftpChannel] = []

    def build(config: SftpConfig) -> SftpChannel:
        opened.append(SftpChannel("partner_sftp", config))
        return opened[-1]

    yield build
    for channel in opened:
        await channel.close()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[AsyncsshSftpServer]:
    root = tmp_path / "remote"
    root.mkdir()
    async with asyncssh_sftp_server(root) as running:
        yield running


def key_config(server: AsyncsshSftpServer, **keys: Any) -> SftpConfig:
    base = {
        "host": "127.0.0.1",
        "port": server.port,
        "username": USERNAME,
        "private_key": server.client_key.private,
        "known_hosts": server.known_hosts,
        "path": "/incoming/firehose",
    }
    return sftp_config(**{**base, **keys})


# --- asyncssh's SFTP server -------------------------------------------------------------


async def test_put_with_key_auth_creates_nested_directories(
    server: AsyncsshSftpServer, channels: Any, tmp_path: Path
) -> None:
    data = b'[{"type":"pd"}]'
    channel = channels(key_config(server))
    await channel.put(make_batch(tmp_path, NAME, data))
    assert remote_files(server.root) == {f"incoming/firehose/{NAME}": sha(data)}


async def test_put_with_password_auth(
    server: AsyncsshSftpServer, channels: Any, tmp_path: Path
) -> None:
    data = b'[{"type":"t"}]'
    config = key_config(server, private_key=None, password=PASSWORD, path="/")
    await channels(config).put(make_batch(tmp_path, "x.json", data))
    assert remote_files(server.root) == {"x.json": sha(data)}


async def test_second_put_of_a_batch_leaves_one_file_over_one_connection(
    server: AsyncsshSftpServer, channels: Any, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB + 17)
    channel = channels(key_config(server))
    batch = make_batch(tmp_path, NAME, data)
    await channel.put(batch)
    await channel.put(batch)
    assert remote_files(server.root) == {f"incoming/firehose/{NAME}": sha(data)}
    assert server.connections == 1


@pytest.mark.parametrize("posix_rename", [True, False], ids=["posix-rename", "plain-rename"])
async def test_put_replaces_an_existing_file(
    tmp_path: Path, channels: Any, monkeypatch: pytest.MonkeyPatch, posix_rename: bool
) -> None:
    if not posix_rename:
        # A real server that does not offer the OpenSSH extension: its plain rename
        # refuses an existing target, so the channel must remove it first.
        extensions = [
            ext
            for ext in asyncssh.sftp.SFTPServerHandler._extensions
            if ext[0] != b"posix-rename@openssh.com"
        ]
        monkeypatch.setattr(asyncssh.sftp.SFTPServerHandler, "_extensions", extensions)
    root = tmp_path / "remote"
    (root / "out").mkdir(parents=True)
    (root / "out" / "x.json").write_bytes(b"stale")
    data = b'[{"type":"c"}]'
    async with asyncssh_sftp_server(root) as server:
        channel = channels(key_config(server, path="/out"))
        await channel.put(make_batch(tmp_path, "x.json", data))
        await channel.close()
    assert remote_files(root) == {"out/x.json": sha(data)}


async def test_unknown_host_key_is_refused_and_nothing_written(
    server: AsyncsshSftpServer, channels: Any, tmp_path: Path
) -> None:
    channel = channels(key_config(server, known_hosts=other_host_key_line(server.port)))
    with pytest.raises(DeliveryError) as caught:
        await channel.put(make_batch(tmp_path, NAME, b"[]"))
    message = str(caught.value)
    assert "host key did not match" in message
    assert f"127.0.0.1:{server.port}" in message
    assert server.fingerprint in message
    assert caught.value.retryable
    assert remote_files(server.root) == {}


async def test_pinned_fingerprint_is_accepted(
    server: AsyncsshSftpServer, channels: Any, tmp_path: Path
) -> None:
    config = key_config(server, known_hosts=None, host_key=server.fingerprint)
    await channels(config).put(make_batch(tmp_path, "x.json", b"[1]"))
    assert remote_files(server.root) == {"incoming/firehose/x.json": sha(b"[1]")}


async def test_wrong_pinned_fingerprint_is_refused(
    server: AsyncsshSftpServer, channels: Any, tmp_path: Path
) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").get_fingerprint("sha256")
    channel = channels(key_config(server, known_hosts=None, host_key=other))
    with pytest.raises(DeliveryError, match="host key did not match"):
        await channel.put(make_batch(tmp_path, "x.json", b"[1]"))
    assert remote_files(server.root) == {}


async def test_check_connects_and_writes_a_probe(server: AsyncsshSftpServer, channels: Any) -> None:
    summary = await channels(key_config(server)).check()
    assert "writable" in summary
    assert server.fingerprint in summary
    assert (server.root / "incoming" / "firehose").is_dir()
    assert remote_files(server.root) == {}


async def test_check_fails_on_a_bad_password(server: AsyncsshSftpServer, channels: Any) -> None:
    config = key_config(server, private_key=None, password="wrong")
    with pytest.raises(DeliveryError, match="authentication failed"):
        await channels(config).check()


async def test_nothing_listening_is_a_delivery_error(channels: Any, tmp_path: Path) -> None:
    port = free_port()
    config = sftp_config(
        host="127.0.0.1", port=port, username="u", password="p", host_key="SHA256:x"
    )
    with pytest.raises(DeliveryError, match=f"127.0.0.1:{port}") as caught:
        await channels(config).put(make_batch(tmp_path, "x.json", b"[]"))
    assert caught.value.retryable


async def test_connect_timeout_on_a_silent_server(channels: Any, tmp_path: Path) -> None:
    # No real SSH server hangs on cue: a TCP listener that never says a word does.
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    config = sftp_config(
        host="127.0.0.1",
        port=port,
        username="u",
        password="p",
        host_key="SHA256:x",
        connect_timeout="300ms",
    )
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryError, match="timed out"):
            await channels(config).put(make_batch(tmp_path, "x.json", b"[]"))
        assert time.monotonic() - started < 5
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()


def test_config_problems() -> None:
    bare = sftp_config(host="h", username="u")
    assert {key for key, _ in bare.problems()} == {"password", "known_hosts"}
    bad = sftp_config(
        host="h",
        username="u",
        private_key="not a key",
        known_hosts="garbage\n",
        host_key="ab:cd",
        max_requests=0,
    )
    assert {key for key, _ in bad.problems()} == {
        "private_key",
        "known_hosts",
        "host_key",
        "max_requests",
    }
    good = sftp_config(host="h", username="u", password="p", host_key="SHA256:abc")
    assert good.problems() == []


# --- OpenSSH sshd -----------------------------------------------------------------------


def openssh_config(server: OpensshServer, remote: Path, **keys: Any) -> SftpConfig:
    base = {
        "host": "127.0.0.1",
        "port": server.port,
        "username": server.username,
        "private_key": server.client_key.private,
        "known_hosts": server.known_hosts,
        "path": str(remote / "incoming"),
    }
    return sftp_config(**{**base, **keys})


async def test_openssh_put_and_check(
    openssh_server: OpensshServer, channels: Any, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    data = os.urandom(MiB)
    channel = channels(openssh_config(openssh_server, remote))
    assert "writable" in await channel.check()
    await channel.put(make_batch(tmp_path, NAME, data))
    assert remote_files(remote) == {f"incoming/{NAME}": sha(data)}
    # The fingerprint exactly as `ssh-keygen -lf` prints it pins the same server.
    pinned = openssh_config(
        openssh_server, remote, known_hosts=None, host_key=openssh_server.fingerprint
    )
    assert openssh_server.fingerprint in await channels(pinned).check()


async def test_openssh_reuses_the_connection_and_reconnects_after_a_drop(
    openssh_server: OpensshServer, channels: Any, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    channel = channels(openssh_config(openssh_server, remote))
    await channel.put(make_batch(tmp_path, "a.json", b"[1]"))
    await channel.put(make_batch(tmp_path, "b.json", b"[2]"))
    assert openssh_server.accepted_connections() == 1
    # The channel cannot have seen the drop yet: this put finds the connection dead
    # and must reconnect within the same call.
    openssh_server.kill_connections()
    with structlog.testing.capture_logs() as logs:
        await channel.put(make_batch(tmp_path, "c.json", b"[3]"))
    assert "channel.reconnecting" in [entry["event"] for entry in logs]
    assert openssh_server.accepted_connections() == 2
    assert set(remote_files(remote)) == {"incoming/a.json", "incoming/b.json", "incoming/c.json"}


async def wait_until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    """Poll an observable condition until it holds, failing after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def has_bytes(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


async def test_openssh_killed_mid_upload_then_recovers(
    openssh_server: OpensshServer, channels: Any, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    data = os.urandom(128 * MiB)
    batch = make_batch(tmp_path, NAME, data)
    channel = channels(openssh_config(openssh_server, remote))
    part = remote / "incoming" / "acme" / "Firehose" / f".{Path(NAME).name}.part"
    upload = asyncio.create_task(channel.put(batch))
    await wait_until(lambda: has_bytes(part) or upload.done())
    if upload.done():
        await upload  # surfaces an early failure
        pytest.fail("the upload finished before the server could be killed")
    openssh_server.stop()
    with pytest.raises(DeliveryError) as caught:
        await upload
    assert caught.value.retryable
    assert f"incoming/{NAME}" not in remote_files(remote)

    openssh_server.start()
    await channel.put(batch)
    assert remote_files(remote) == {f"incoming/{NAME}": sha(data)}


async def test_openssh_throughput_close_to_raw_asyncssh(
    openssh_server: OpensshServer, channels: Any, tmp_path: Path
) -> None:
    remote = tmp_path / "remote"
    (remote / "raw").mkdir(parents=True)
    batch = make_batch(tmp_path, "big.json", os.urandom(64 * MiB))
    channel = channels(openssh_config(openssh_server, remote))
    await channel.check()  # connect first: compare transfers, not handshakes
    ours: list[float] = []
    raw: list[float] = []
    async with (
        asyncssh.connect(
            "127.0.0.1",
            openssh_server.port,
            username=openssh_server.username,
            client_keys=[asyncssh.import_private_key(openssh_server.client_key.private)],
            known_hosts=asyncssh.import_known_hosts(openssh_server.known_hosts),
            config=None,
            agent_path=None,
        ) as conn,
        conn.start_sftp_client() as sftp,
    ):
        # Interleaved, so that page cache and disk writeback weigh on both alike.
        for _ in range(4):
            started = time.perf_counter()
            await channel.put(batch)
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            await sftp.put(str(batch.path), str(remote / "raw" / "big.json"))
            raw.append(time.perf_counter() - started)
    assert remote_files(remote)["incoming/big.json"] == remote_files(remote)["raw/big.json"]
    # Throughput ratio of the best runs: ours must reach 0.7 x raw asyncssh.
    assert min(raw) / min(ours) >= 0.7, (ours, raw)
