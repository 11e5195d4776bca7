"""`sftp`: upload each batch as a file to an SSH server (asyncssh).

A batch goes to `<path>/<dir of name>/.<basename>.part` in parallel blocks, then is
renamed to its final name, so readers never see a partial file and a retry of the same
batch replaces the file with identical bytes. Host keys are always verified, against
`known_hosts` or a pinned fingerprint; an unknown key is never accepted.

One SSH connection and SFTP session serve every batch; a put that finds it dead
reconnects once, then leaves further retries to the delivery worker.

As an import source it lists a directory with READDIR (the server sends the entries in
pages) and downloads a file with parallel reads, over the same session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncssh
import msgspec
import structlog

from firehosed import fileio
from firehosed.channels.base import (
    Batch,
    Channel,
    RemoteFile,
    gone,
    joined,
    relative_name,
    selected,
    source_pattern,
    synced_size,
    unchanged,
)
from firehosed.errors import DeliveryError
from firehosed.units import Duration, Size

log = structlog.get_logger(__name__)

# Errors meaning the connection (not the request) failed: a session that had been idle
# may have been dropped by the server or a NAT, so one fresh connection is worth a try.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncssh.DisconnectError,
    asyncssh.ChannelOpenError,
    asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection,
    OSError,  # also a local read error: costs one needless reconnect, never a wrong result
)
_LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
    asyncssh.Error,
    asyncssh.KeyImportError,
    asyncssh.KeyEncryptionError,
    OSError,  # TimeoutError included
)
_CLOSE_TIMEOUT = 5.0
# Probe a dead peer while idle between batches (and keep NAT entries alive).
_KEEPALIVE_INTERVAL = 30.0
# AES-GCM first: with the AES instructions of today's CPUs it moves bulk data about a
# quarter faster than asyncssh's first choice, chacha20-poly1305, which stays offered.
_ENCRYPTION_ALGS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)


class SftpConfig(
    msgspec.Struct, tag="sftp", tag_field="type", forbid_unknown_fields=True, kw_only=True
):
    """`type = "sftp"`: files go under `path` on `host`, created when missing.

    Authenticate with `password` and/or `private_key` (key text, optionally encrypted
    with `passphrase`). The server's host key must match `known_hosts` (OpenSSH
    known_hosts text, e.g. from `known_hosts_file`) or the pinned `host_key`
    fingerprint ("SHA256:..." as `ssh-keygen -lf` prints it); either one suffices.
    `block_size` and `max_requests` tune the parallel writes (default: the server's
    advertised limits and asyncssh's request count).
    """

    host: str
    port: int = 22
    username: str
    password: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    private_key: str | None = None
    private_key_env: str | None = None
    private_key_file: str | None = None
    passphrase: str | None = None
    passphrase_env: str | None = None
    passphrase_file: str | None = None
    known_hosts: str | None = None
    known_hosts_file: str | None = None
    host_key: str | None = None
    path: str = "/"
    connect_timeout: Duration = Duration(10.0)
    block_size: Size | None = None
    max_requests: int | None = None

    def problems(self) -> list[tuple[str, str]]:
        """Cross-key rules, checked at config load (secrets already resolved)."""
        found: list[tuple[str, str]] = []
        if not self.password and not self.private_key:
            found.append(("password", "set password or private_key (or their _env/_file)"))
        if not self.known_hosts and not self.host_key:
            found.append(
                (
                    "known_hosts",
                    "set known_hosts_file or host_key: host keys are never auto-accepted",
                )
            )
        if not 0 < self.port < 65536:
            found.append(("port", "must be between 1 and 65535"))
        if self.host_key is not None and not self.host_key.startswith(("SHA256:", "MD5:")):
            found.append(("host_key", 'expected a fingerprint like "SHA256:..." (ssh-keygen -lf)'))
        if not self.path:
            found.append(("path", 'must not be empty (the default is "/")'))
        if self.max_requests is not None and self.max_requests < 1:
            found.append(("max_requests", "must be at least 1"))
        if self.block_size is not None and self.block_size < 1024:
            found.append(("block_size", "must be at least 1KiB"))
        found += self._parse_problems()
        return found

    def _parse_problems(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        if self.private_key:
            try:
                asyncssh.import_private_key(self.private_key, self.passphrase)
            except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
                found.append(("private_key", f"unusable private key: {exc}"))
        if self.known_hosts:
            try:
                asyncssh.import_known_hosts(self.known_hosts)
            except ValueError as exc:
                found.append(("known_hosts", f"invalid known_hosts: {exc}"))
        return found


class _Client(asyncssh.SSHClient):
    """Accepts a host key outside known_hosts only if it matches the pinned fingerprint.

    Remembers the fingerprint the server presented, for the error message, and whether
    the connection has been lost, so a dead session is never handed out.
    """

    def __init__(self, pinned: str | None) -> None:
        self.pinned = pinned.rstrip("=") if pinned else None
        self.presented: str | None = None
        self.lost = False

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.presented = str(key.get_fingerprint("sha256"))
        if self.pinned is None:
            return False
        algorithm = "md5" if self.pinned.startswith("MD5:") else "sha256"
        return bool(key.get_fingerprint(algorithm) == self.pinned)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@dataclass(eq=False)
class _Session:
    """One authenticated SSH connection with its SFTP client."""

    conn: asyncssh.SSHClientConnection
    sftp: asyncssh.SFTPClient
    client: _Client
    # Remote directories known to exist on this session: saves a round trip per batch.
    dirs: set[str] = field(default_factory=set)


class SftpChannel(Channel):
    """Uploads batches over one reused SFTP session; see the module docstring."""

    def __init__(self, name: str, config: SftpConfig) -> None:
        super().__init__(name)
        self.config = config
        self._session: _Session | None = None
        self._connect_lock = asyncio.Lock()

    @property
    def _where(self) -> str:
        return f"{self.config.username}@{self.config.host}:{self.config.port}"

    async def put(self, batch: Batch) -> None:
        """Upload `batch` as `.NAME.part`, then rename it to NAME under `path`."""
        relative_name(batch.name)
        await self._run(lambda session: self._upload(session, batch))
        log.debug("channel.uploaded", channel=self.name, batch=batch.id, bytes=batch.size)

    async def check(self) -> str:
        """Connect, authenticate, create `path`, write and remove a probe file."""
        fingerprint = await self._run(self._probe)
        return f"sftp {self._where} {self.config.path} is writable (host key {fingerprint})"

    async def list_files(self, pattern: str, *, account: str) -> list[RemoteFile]:
        """Regular files (not symlinks) in the pattern's directory under `path`; version:
        the modification time in seconds (all SFTP version 3, OpenSSH's, carries)."""
        directory, glob = source_pattern(pattern, f"sftp {self._where}")
        remote = posixpath.join(self.config.path, directory) if directory else self.config.path
        listed: list[RemoteFile] = await self._run(
            lambda session: _list(session.sftp, remote, directory, glob), about=remote
        )
        return listed

    async def fetch(
        self, name: str, target: Path, *, account: str, version: str | None = None
    ) -> int:
        """Download `name` under `path` into `target` (parallel reads), fsync it.
        SourceChanged if its modification time is no longer `version` once downloaded."""
        remote = posixpath.join(self.config.path, relative_name(name, "file name"))
        modified = await self._run(
            lambda session: self._download(session, remote, target), about=remote
        )
        unchanged(f"sftp {self._where}: {remote}", version, modified)
        return await asyncio.to_thread(synced_size, target)

    async def close(self) -> None:
        """Close the SFTP session and its SSH connection."""
        session, self._session = self._session, None
        if session is not None:
            await _close(session)

    async def _run(
        self, operation: Callable[[_Session], Awaitable[Any]], about: str | None = None
    ) -> Any:
        """Run `operation` on the shared session, reconnecting once if it was dead.

        `about`: the remote path the operation reads, named in its error messages.
        """
        try:
            session, reused = await self._current_session()
            try:
                return await operation(session)
            except _CONNECTION_ERRORS as exc:
                await self._discard(session)
                if not reused:
                    raise
                log.warning("channel.reconnecting", channel=self.name, error=str(exc))
                session, _ = await self._current_session()
                return await operation(session)
        except _LIBRARY_ERRORS as exc:
            raise self._delivery_error(exc, about) from exc

    async def _current_session(self) -> tuple[_Session, bool]:
        """The live session, and whether it existed before this call (was reused)."""
        async with self._connect_lock:
            session = self._session
            if session is not None and not session.client.lost:
                return session, True
            if session is not None:
                await self._discard(session)
            self._session = await self._connect()
            return self._session, False

    async def _connect(self) -> _Session:
        client = _Client(self.config.host_key)
        try:
            conn = await asyncssh.connect(
                self.config.host,
                self.config.port,
                client_factory=lambda: client,
                **self._connect_options(),
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise self._host_key_error(client.presented, exc) from exc
        try:
            sftp = await conn.start_sftp_client()
        except BaseException:
            conn.close()
            raise
        log.info(
            "channel.connected",
            channel=self.name,
            host=self.config.host,
            port=self.config.port,
            server=conn.get_extra_info("server_version"),
        )
        return _Session(conn=conn, sftp=sftp, client=client)

    def _connect_options(self) -> dict[str, Any]:
        """asyncssh options: only what the config says, nothing from ~/.ssh or an agent."""
        config = self.config
        keys = None
        if config.private_key:
            keys = [asyncssh.import_private_key(config.private_key, config.passphrase)]
        return {
            "username": config.username,
            "password": config.password,
            "client_keys": keys,
            # An empty known_hosts (not None, which would disable checking) leaves the
            # decision to _Client.validate_host_public_key and its pinned fingerprint.
            "known_hosts": asyncssh.import_known_hosts(config.known_hosts or ""),
            "config": None,
            "agent_path": None,
            "x509_trusted_certs": None,
            "gss_auth": False,
            "gss_kex": False,
            "connect_timeout": config.connect_timeout,
            "keepalive_interval": _KEEPALIVE_INTERVAL,
            "encryption_algs": _ENCRYPTION_ALGS,
        }

    async def _discard(self, session: _Session) -> None:
        if self._session is session:
            self._session = None
        await _close(session)

    async def _upload(self, session: _Session, batch: Batch) -> None:
        target = posixpath.join(self.config.path, batch.name)
        directory, basename = posixpath.split(target)
        part = posixpath.join(directory, f".{basename}.part")
        try:
            await self._ensure_directory(session, directory)
            await session.sftp.put(
                str(batch.path),
                part,
                block_size=self.config.block_size or -1,
                max_requests=self.config.max_requests or -1,
            )
            await _replace(session.sftp, part, target)
        except asyncssh.SFTPError:
            # The directory may have been removed behind our back: look again next time.
            session.dirs.clear()
            raise

    async def _download(self, session: _Session, remote: str, target: Path) -> str:
        """Download `remote` into `target`; its modification time once downloaded."""
        # A symlink is followed (its file copied), never recreated locally.
        pacer = _Pacer(target)
        try:
            await session.sftp.get(
                remote,
                str(target),
                follow_symlinks=True,
                sparse=False,
                block_size=self.config.block_size or -1,
                max_requests=self.config.max_requests or -1,
                progress_handler=pacer.progress,
            )
        except asyncssh.SFTPNoSuchFile as exc:
            raise gone(f"sftp {self._where}: {remote}") from exc
        finally:
            await pacer.settled()
        return str((await session.sftp.stat(remote)).mtime or 0)

    async def _ensure_directory(self, session: _Session, directory: str) -> None:
        if directory in session.dirs:
            return
        if not await session.sftp.isdir(directory):
            await session.sftp.makedirs(directory, exist_ok=True)
        session.dirs.add(directory)

    async def _probe(self, session: _Session) -> str:
        await self._ensure_directory(session, self.config.path)
        probe = posixpath.join(self.config.path, f".firehosed-check-{secrets.token_hex(4)}")
        async with session.sftp.open(probe, "wb") as file:
            await file.write(b"firehosed check\n")
        await session.sftp.remove(probe)
        return _host_fingerprint(session.conn)

    def _host_key_error(self, presented: str | None, exc: Exception) -> DeliveryError:
        # Retryable: an operator may fix known_hosts or the server; the worker alerts.
        return DeliveryError(
            f"sftp {self._where}: host key did not match: the server presented "
            f"{presented or 'a key'}, which is neither in known_hosts nor the pinned "
            f"host_key (unknown or changed host key); refusing to connect ({exc})"
        )

    def _delivery_error(self, exc: BaseException, about: str | None = None) -> DeliveryError:
        """Translate a library error into a DeliveryError that names the destination
        (and `about`, the remote path read, if any)."""
        where = self._where if about is None else f"{self._where} {about}"
        if isinstance(exc, asyncssh.PermissionDenied):
            return DeliveryError(f"sftp {where}: authentication failed ({exc})")
        if isinstance(exc, asyncssh.KeyImportError | asyncssh.KeyEncryptionError):
            return DeliveryError(f"sftp {where}: unusable private key ({exc})", retryable=False)
        if isinstance(exc, asyncssh.SFTPError) and not isinstance(exc, _CONNECTION_ERRORS):
            return DeliveryError(f"sftp {where}: server refused: {exc.reason}")
        if isinstance(exc, TimeoutError):
            return DeliveryError(f"sftp {where}: timed out")
        if isinstance(exc, OSError):
            about = f" ({exc.filename})" if exc.filename else ""
            return DeliveryError(f"sftp {where}: {exc.strerror or exc}{about}")
        return DeliveryError(f"sftp {where}: connection failed: {exc}")


async def _replace(sftp: asyncssh.SFTPClient, part: str, target: str) -> None:
    """Rename `part` over `target`: atomically where the server offers posix-rename."""
    with contextlib.suppress(asyncssh.SFTPOpUnsupported):
        await sftp.posix_rename(part, target)
        return
    # Plain SFTP rename refuses an existing target: a retried batch must replace it.
    with contextlib.suppress(asyncssh.SFTPNoSuchFile):
        await sftp.remove(target)
    await sftp.rename(part, target)


async def _list(
    sftp: asyncssh.SFTPClient, remote: str, directory: str, glob: str
) -> list[RemoteFile]:
    """The files `glob` selects in `remote` (the pattern's `directory`), sorted."""
    found: list[RemoteFile] = []
    try:
        async for entry in sftp.scandir(remote):
            filename, attrs = cast(str, entry.filename), entry.attrs  # str for a str path
            if attrs.type == asyncssh.FILEXFER_TYPE_REGULAR and selected(filename, glob):
                name = joined(directory, filename)
                found.append(RemoteFile(name, attrs.size or 0, str(attrs.mtime or 0)))
    except asyncssh.SFTPNoSuchFile:
        return []
    return sorted(found, key=lambda file: file.name)


def _host_fingerprint(conn: asyncssh.SSHClientConnection) -> str:
    key = conn.get_server_host_key()
    return str(key.get_fingerprint("sha256")) if key is not None else "unknown"


async def _close(session: _Session) -> None:
    session.sftp.exit()
    session.conn.close()
    with contextlib.suppress(TimeoutError, asyncssh.Error, OSError):
        await asyncio.wait_for(session.conn.wait_closed(), _CLOSE_TIMEOUT)


class _Pacer:
    """Writes a download out PACE bytes at a time (fileio.Paced says why): asyncssh writes
    the local file itself, and tells each block copied to `progress`, which writes out
    the bytes copied until then in a thread (one at a time)."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.written = 0  # bytes written out, or being written
        self.writing: asyncio.Future[None] | None = None

    def progress(self, _source: bytes, _target: bytes, copied: int, _total: int) -> None:
        idle = self.writing is None or self.writing.done()
        if idle and copied - self.written >= fileio.PACE:
            self.writing = asyncio.ensure_future(asyncio.to_thread(self._write_out, copied))
            self.written = copied

    def _write_out(self, copied: int) -> None:
        fd = os.open(self.target, os.O_RDONLY)
        try:
            fileio.write_out(fd, 0, copied, wait=True)
        finally:
            os.close(fd)

    async def settled(self) -> None:
        """Wait for the writing in flight (the download's own fsync follows)."""
        if self.writing is not None:
            with contextlib.suppress(OSError):  # the final fsync says so, if it still is
                await self.writing
