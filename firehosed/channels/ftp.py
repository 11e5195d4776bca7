"""`ftp` and `ftpes`: upload each batch to an FTP server, in clear or over explicit TLS.

Uploads are atomic: the batch is stored as `.NAME.part` beside its final name, then
renamed (RNFR/RNTO), so the customer's pick-up job never sees a partial file, and a
retry of the same batch replaces the file with identical bytes. One control
connection is kept across batches; it is probed with NOOP before reuse, so a server
that dropped an idle session costs one reconnect, not a failed batch.

`ftpes` is explicit FTPS (RFC 4217): AUTH TLS before USER, the server's certificate
verified (the system CAs, or `ca`), PBSZ 0 and PROT P so data connections are encrypted
too. A server that does not offer TLS is an error, never a reason to fall back to clear
text. Data connections are passive, always to the control connection's host (the
address in a PASV reply is often wrong behind NAT).

As an import source it lists a directory with MLSD (type, size and modification time
per file, streamed), or, on servers without MLSD such as vsftpd, with NLST and then SIZE
and MDTM for each matching name; it downloads with RETR into the target in 1 MiB
writes. Both use the same control connection and TLS data protection as uploads.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import posixpath
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal, TypeVar

import aioftp
import msgspec
import structlog
from aioftp.common import SSLSessionBoundContext

from firehosed.channels.base import (
    Batch,
    Channel,
    RemoteFile,
    gone,
    joined,
    relative_name,
    selected,
    source_pattern,
    sync_file,
    unchanged,
)
from firehosed.errors import DeliveryError
from firehosed.fileio import Paced
from firehosed.units import Duration

log = structlog.get_logger(__name__)

_BLOCK = 1 << 20
_PROBE = ".firehosed-check"
# What the network, TLS and the FTP server can raise; each becomes a DeliveryError.
# TimeoutError and ssl.SSLError are OSErrors; aioftp.InvalidCommand (CR/LF in a
# name) is an AIOFTPException.
_FAILURES = (aioftp.AIOFTPException, OSError)

_T = TypeVar("_T")
_Data = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _FtpBase(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Keys common to `ftp` and `ftpes`."""

    host: str
    port: int = 21
    username: str = "anonymous"
    password: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    # The remote directory batches go under; relative paths start at the login directory.
    path: str = "/"
    # Bounds connecting, the TLS handshake and logging in, together.
    connect_timeout: Duration = Duration(10.0)
    # Bounds each later read or write on the control and data connections.
    timeout: Duration = Duration(60.0)

    def problems(self) -> list[tuple[str, str]]:
        """Cross-key rules checked at config load."""
        found: list[tuple[str, str]] = []
        if not self.host:
            found.append(("host", "must not be empty"))
        if not 0 < self.port < 65536:
            found.append(("port", "must be between 1 and 65535"))
        if not self.path or "\r" in self.path or "\n" in self.path:
            found.append(("path", "must be a non-empty path without line breaks"))
        for key in ("connect_timeout", "timeout"):
            if getattr(self, key) <= 0:
                found.append((key, "must be greater than 0"))
        return found


class FtpConfig(_FtpBase, tag="ftp", tag_field="type"):
    """`type = "ftp"`: plain FTP; the password and the data cross the network in clear."""


class FtpesConfig(_FtpBase, tag="ftpes", tag_field="type"):
    """`type = "ftpes"`: FTP over explicit TLS, the server's certificate verified.

    `ca` (or `ca_file`) holds the PEM certificates to trust instead of the system's;
    `server_hostname` is the name the certificate must carry (default: `host`).
    """

    ca: str | None = None
    ca_file: str | None = None
    server_hostname: str | None = None

    def problems(self) -> list[tuple[str, str]]:
        """Also reject a `ca` that holds no usable PEM certificate."""
        found = super().problems()
        if self.ca is not None:
            try:
                ssl.create_default_context(cadata=self.ca)
            except (ssl.SSLError, ValueError) as exc:
                key = "ca_file" if self.ca_file else "ca"
                found.append((key, f"no PEM CA certificate could be loaded ({exc})"))
        return found


class _TlsRefused(aioftp.AIOFTPException):
    """The server answered AUTH TLS with an error: FTPES is impossible there."""


class _Client(aioftp.Client):
    """aioftp's client, plus FTPES data connections that servers requiring reuse accept.

    aioftp (>= 0.26) wraps a data connection in TLS as soon as it connects, before the
    transfer command is sent. vsftpd starts the data handshake only once it has the
    command, so that order deadlocks; and with `require_ssl_reuse=YES` (its default)
    it refuses a data connection that does not resume the control connection's TLS
    session, which is how it knows the data comes from the authenticated client.
    Every transfer (STOR, RETR, MLSD, NLST) therefore opens the data connection in
    clear, sends its command, and only then does the handshake, resuming the control
    session.
    """

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None,
        tls_name: str,
        connect_timeout: float,
        timeout: float,
    ) -> None:
        super().__init__(socket_timeout=timeout, connection_timeout=connect_timeout)
        self.tls = tls
        self.tls_name = tls_name

    async def secure(self, tls: ssl.SSLContext) -> None:
        """AUTH TLS and the handshake; a server without TLS is refused, never used in clear."""
        try:
            await self.command("AUTH TLS", "234")
        except aioftp.StatusCodeError as exc:
            raise _TlsRefused(
                f"server refused AUTH TLS ({_status(exc)}): it does not offer FTPES, "
                "and nothing is sent in clear"
            ) from exc
        await self.stream.writer.start_tls(tls, server_hostname=self.tls_name)

    async def protect_data(self) -> None:
        """PBSZ 0 and PROT P: every data connection from now on is encrypted."""
        await self.command("PBSZ 0", "200")
        await self.command("PROT P", "200")

    async def store(self, remote: PurePosixPath, source: BinaryIO) -> int:
        """STOR `source`'s bytes as `remote` over a passive data connection; count them."""
        sent = 0
        async with self._transfer(f"STOR {remote}") as (_reader, writer):
            while block := await asyncio.to_thread(source.read, _BLOCK):
                writer.write(block)
                await asyncio.wait_for(writer.drain(), self.socket_timeout)
                sent += len(block)
        return sent

    async def retrieve(self, remote: PurePosixPath, target: Paced) -> int:
        """RETR `remote` into `target` over a passive data connection; count the bytes."""
        received = 0
        async with self._transfer(f"RETR {remote}") as (reader, _writer):
            while block := await self._read_block(reader):
                await asyncio.to_thread(target.write, block)
                received += len(block)
        return received

    async def listing(self, command: str, keep: Callable[[str], _T | None]) -> list[_T]:
        """Send `command` (MLSD or NLST) and keep what `keep` makes of each line it sends,
        as it arrives (a line `keep` maps to None is dropped)."""
        kept: list[_T] = []
        async with self._transfer(command) as (reader, _writer):
            while line := await asyncio.wait_for(reader.readline(), self.socket_timeout):
                text = line.decode(self.encoding, errors="replace").rstrip("\r\n")
                if (item := keep(text)) is not None:
                    kept.append(item)
        return kept

    async def modified(self, remote: PurePosixPath) -> str:
        """The server's MDTM of `remote` (YYYYMMDDHHMMSS in UTC)."""
        _, info = await self.command(f"MDTM {remote}", "213")
        return info[-1].strip()

    @contextlib.asynccontextmanager
    async def _transfer(self, command: str) -> AsyncIterator[_Data]:
        """A passive data connection for `command`, encrypted (FTPES) once the server has
        accepted the command; the server's final reply is awaited when the body is done."""
        reader, writer = await self._open_data()
        try:
            await self.command(command, "1xx")
            if self.tls is not None:
                await writer.start_tls(
                    self._resumed_session(),
                    server_hostname=self.tls_name,
                    ssl_handshake_timeout=self.socket_timeout,
                )
            yield reader, writer
        finally:
            writer.close()
        await self.command(None, "2xx", "1xx")
        # The server has answered, so its side is done: this only reaps the socket.
        with contextlib.suppress(OSError):
            await asyncio.wait_for(writer.wait_closed(), self.socket_timeout)

    async def _read_block(self, reader: asyncio.StreamReader) -> bytearray:
        """Up to _BLOCK bytes (empty at the end of the data), so writes go in big blocks."""
        block = bytearray()
        while len(block) < _BLOCK:
            chunk = await asyncio.wait_for(reader.read(_BLOCK - len(block)), self.socket_timeout)
            if not chunk:
                break
            block += chunk
        return block

    async def size(self, remote: PurePosixPath) -> int | None:
        """The server's SIZE of `remote`, or None when the server does not implement SIZE."""
        try:
            _, info = await self.command(f"SIZE {remote}", "213")
        except aioftp.StatusCodeError as exc:
            if exc.received_codes[-1].matches("50x"):
                return None
            raise
        text = info[-1].strip()
        return int(text) if text.isdigit() else None

    async def _open_data(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        await self.command("TYPE I", "200")
        try:
            _, info = await self.command("EPSV", "229")
            _, port = self.parse_epsv_response(info[-1])
        except aioftp.StatusCodeError as exc:
            if not exc.received_codes[-1].matches("50x"):
                raise
            _, info = await self.command("PASV", "227")
            _, port = self.parse_pasv_response(info[-1])
        return await asyncio.wait_for(
            asyncio.open_connection(self.server_host, port), self.connection_timeout
        )

    def _resumed_session(self) -> ssl.SSLContext:
        control = self.stream.writer.get_extra_info("ssl_object")
        return SSLSessionBoundContext(
            ssl.PROTOCOL_TLS_CLIENT, context=control.context, session=control.session
        )

    async def aclose(self) -> None:
        """QUIT politely, then close; a server that already hung up is fine."""
        with contextlib.suppress(*_FAILURES):
            await self.quit()
        self.close()
        with contextlib.suppress(*_FAILURES):
            await asyncio.wait_for(self.stream.writer.wait_closed(), self.socket_timeout)


class FtpChannel(Channel):
    """Delivers batches to an FTP or FTPES server over one reused control connection.

    Calls are serialized (one control connection carries one command at a time).
    After any failure the connection is dropped, so the next attempt starts clean.
    """

    def __init__(self, name: str, config: FtpConfig | FtpesConfig) -> None:
        super().__init__(name)
        self.config = config
        self.root = PurePosixPath(config.path)
        self.tls: ssl.SSLContext | None = None
        self.tls_name = config.host
        if isinstance(config, FtpesConfig):
            self.tls = ssl.create_default_context(cadata=config.ca)
            self.tls_name = config.server_hostname or config.host
        self.scheme = "ftp" if self.tls is None else "ftpes"
        self._client: _Client | None = None
        # Directories made (or found) on the current connection: MKD is sent once each.
        self._dirs: set[PurePosixPath] = set()
        # How this server lists a directory: MLSD until it answers that it has none.
        self._listing: Literal["MLSD", "NLST"] = "MLSD"
        self._lock = asyncio.Lock()

    async def put(self, batch: Batch) -> None:
        target = self.root / relative_name(batch.name)
        async with self._lock:
            with self._translated():
                client = await self._connection()
                await self._make_dirs(client, target.parent)
                source = await asyncio.to_thread(batch.path.open, "rb")
                with source:
                    await self._store_atomically(client, source, target)
        log.debug("channel.uploaded", channel=self.name, batch=batch.id, bytes=batch.size)

    async def check(self) -> str:
        probe = self.root / _PROBE
        async with self._lock:
            with self._translated():
                client = await self._connection()
                await self._make_dirs(client, self.root)
                await client.store(probe, io.BytesIO(b"firehosed check\n"))
                await client.remove_file(probe)
        cfg = self.config
        return f"{self.scheme} {cfg.username}@{cfg.host}:{cfg.port} path {self.root} is writable"

    async def list_files(self, pattern: str, *, account: str) -> list[RemoteFile]:
        """Files in the pattern's directory under `path`; version: the modification time in
        seconds. A directory the server answers 550 for lists as no files (FTP servers use
        550 both for "no such directory" and for "permission denied")."""
        directory, glob = source_pattern(pattern, self._where())
        path = self.root / directory
        async with self._lock:
            with self._translated(path):
                client = await self._connection()
                files = await self._list(client, path, directory, glob)
        return sorted(files, key=lambda file: file.name)

    async def fetch(
        self, name: str, target: Path, *, account: str, version: str | None = None
    ) -> int:
        """RETR `name` under `path` into `target` in 1 MiB writes (written out as they go:
        fileio.PACE), then fsync it. SourceChanged if its MDTM is no longer `version`
        once retrieved (a server without MDTM: not checked)."""
        remote = self.root / relative_name(name, "file name")
        async with self._lock:
            with self._translated(remote):
                client = await self._connection()
                with await asyncio.to_thread(target.open, "wb") as file:
                    received = await self._retrieve(client, remote, Paced(file))
                    await asyncio.to_thread(sync_file, file)
                if version is not None and (stamp := await self._modified(client, remote)):
                    unchanged(f"{self._where()}: {remote}", version, _seconds(stamp))
        return received

    async def _retrieve(self, client: _Client, remote: PurePosixPath, target: Paced) -> int:
        """RETR `remote`; SourceChanged for a file the server answers 550 for (gone, or
        no longer readable: FTP says one for both), so that the run lists it again."""
        try:
            return await client.retrieve(remote, target)
        except aioftp.StatusCodeError as exc:
            if not exc.received_codes[-1].matches("550"):
                raise
            self._drop()  # (the transfer's state after a refused RETR is not relied on)
            raise gone(
                f"{self._where()} {remote}", f", or unreadable (server answered {_status(exc)})"
            ) from exc

    async def _modified(self, client: _Client, remote: PurePosixPath) -> str | None:
        """MDTM of `remote`; None from a server that has no MDTM."""
        try:
            return await client.modified(remote)
        except aioftp.StatusCodeError as exc:
            if exc.received_codes[-1].matches("50x"):
                return None
            raise

    async def _list(
        self, client: _Client, path: PurePosixPath, directory: str, glob: str
    ) -> list[RemoteFile]:
        try:
            if self._listing == "MLSD":
                files = await self._mlsd(client, path, directory, glob)
                if files is not None:
                    return files
            names = await client.listing(f"NLST {path}", partial(_nlst_name, glob))
        except aioftp.StatusCodeError as exc:
            # Servers answer 550 both for "no such directory" and for "permission denied".
            if exc.received_codes[-1].matches("550"):
                return []
            raise
        return await self._stat(client, path, directory, names)

    async def _mlsd(
        self, client: _Client, path: PurePosixPath, directory: str, glob: str
    ) -> list[RemoteFile] | None:
        """The files MLSD lists, or None (and NLST from now on) where the server has none."""
        try:
            return await client.listing(f"MLSD {path}", partial(_mlsd_file, directory, glob))
        except aioftp.StatusCodeError as exc:
            if not exc.received_codes[-1].matches("50x"):
                raise
            log.info("ftp.no_mlsd", channel=self.name, reply=_status(exc))
        self._listing = "NLST"
        return None

    async def _stat(
        self, client: _Client, path: PurePosixPath, directory: str, names: list[str]
    ) -> list[RemoteFile]:
        """SIZE and MDTM of each name NLST gave; a name SIZE refuses with 550 (a directory,
        or a file removed since) is no file."""
        files: list[RemoteFile] = []
        for filename in names:
            remote = path / filename
            try:
                size = await client.size(remote)
            except aioftp.StatusCodeError as exc:
                if not exc.received_codes[-1].matches("550"):
                    raise
                continue
            if size is None:
                raise DeliveryError(
                    f"{self._where()}: the server has neither MLSD nor SIZE: "
                    "it cannot be an import source",
                    retryable=False,
                )
            stamp = await client.modified(remote)
            files.append(RemoteFile(joined(directory, filename), size, _seconds(stamp)))
        return files

    async def close(self) -> None:
        async with self._lock:
            client, self._client = self._client, None
            if client is not None:
                await client.aclose()

    async def _connection(self) -> _Client:
        if self._client is not None:
            try:
                await self._client.command("NOOP", "2xx")
                return self._client
            except _FAILURES as exc:
                log.info("channel.reconnecting", channel=self.name, error=_describe(exc))
                self._drop()
        self._client = await self._connect()
        return self._client

    async def _connect(self) -> _Client:
        cfg = self.config
        client = _Client(
            tls=self.tls,
            tls_name=self.tls_name,
            connect_timeout=cfg.connect_timeout,
            timeout=cfg.timeout,
        )
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                await client.connect(cfg.host, cfg.port)
                if self.tls is not None:
                    await client.secure(self.tls)
                await client.login(cfg.username, cfg.password or "")
                if self.tls is not None:
                    await client.protect_data()
        except BaseException as exc:
            client.close()
            if isinstance(exc, Exception):  # (not on cancellation: nothing more to await)
                await _reaped(client)
            raise
        log.info(
            "channel.connected", channel=self.name, host=cfg.host, port=cfg.port, tls=bool(self.tls)
        )
        return client

    async def _make_dirs(self, client: _Client, directory: PurePosixPath) -> None:
        for path in (*reversed(directory.parents), directory):
            if not path.name or path in self._dirs:
                continue
            # Servers answer 550 both for "exists" and for "denied", so a failed MKD is
            # not an error here: a directory that is really missing fails the STOR.
            with contextlib.suppress(aioftp.StatusCodeError):
                await client.command(f"MKD {path}", "257")
            self._dirs.add(path)

    async def _store_atomically(
        self, client: _Client, source: BinaryIO, target: PurePosixPath
    ) -> None:
        part = target.with_name(f".{target.name}.part")
        sent = await client.store(part, source)
        # A plain FTP data connection cut short looks like a complete upload to the
        # server (EOF ends a STOR), so compare sizes before the rename publishes it.
        stored = await client.size(part)
        if stored is not None and stored != sent:
            raise DeliveryError(f"{self._where()}: {part} holds {stored} of {sent} bytes sent")
        await client.command(f"RNFR {part}", "350")
        try:
            await client.command(f"RNTO {target}", "2xx")
        except aioftp.StatusCodeError:
            # Some servers refuse to rename onto an existing file; a retried batch must
            # still replace it (with the same bytes), so delete the old one and retry once.
            await client.remove_file(target)
            await client.rename(part, target)

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None
        self._dirs.clear()

    @contextlib.contextmanager
    def _translated(self, about: PurePosixPath | None = None) -> Iterator[None]:
        """Drop the connection on any failure and raise it as a DeliveryError (naming
        `about`, the remote path read, if any)."""
        try:
            yield
        except _FAILURES as exc:
            self._drop()
            where = self._where() if about is None else f"{self._where()} {about}"
            raise DeliveryError(f"{where}: {_describe(exc, self.tls_name)}") from exc
        except asyncio.CancelledError:
            # Cancelled mid-command: the connection's state is unknown.
            self._drop()
            raise

    def _where(self) -> str:
        return f"{self.scheme}://{self.config.host}:{self.config.port}"


def _describe(exc: BaseException, tls_name: str | None = None) -> str:
    """One line naming what went wrong, for logs and DeliveryError messages."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate for {tls_name} not trusted: {exc.verify_message}"
    if isinstance(exc, aioftp.StatusCodeError):
        return f"server answered {_status(exc)}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionResetError) and not exc.args:
        return "connection closed by the server"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def _mlsd_file(directory: str, glob: str, line: str) -> RemoteFile | None:
    """The file an MLSD line (`type=file;size=12;modify=20260101120000; name`) names, if
    it is a regular file `glob` selects."""
    facts, _, filename = line.partition(" ")
    info = dict(fact.partition("=")[::2] for fact in facts.lower().split(";"))
    size = info.get("size", "")
    if info.get("type") != "file" or not size.isdigit() or not selected(filename, glob):
        return None
    return RemoteFile(joined(directory, filename), int(size), _seconds(info.get("modify", "")))


def _nlst_name(glob: str, line: str) -> str | None:
    """The name in an NLST line, if `glob` selects it (servers differ on whether they
    prefix it with the directory listed)."""
    filename = posixpath.basename(line)
    return filename if selected(filename, glob) else None


def _seconds(stamp: str) -> str:
    """An FTP time (`YYYYMMDDHHMMSS[.fff]` in UTC, MLSD's modify and MDTM's answer) as
    whole seconds since the epoch; a stamp in no such form as it is."""
    try:
        moment = datetime.strptime(stamp[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return stamp
    return str(int(moment.timestamp()))


def _status(exc: aioftp.StatusCodeError) -> str:
    text = " ".join(line.strip() for line in exc.info) if isinstance(exc.info, list) else exc.info
    return f"{exc.received_codes[-1]} {text}".strip()


__all__ = ["FtpChannel", "FtpConfig", "FtpesConfig"]


async def _reaped(client: _Client) -> None:
    """Wait until a client closed after a failed connect or login has let go of its
    socket: a TLS connection closes in steps, and a socket left to the collector warns
    (and leaks) wherever the next collection happens to run."""
    try:
        writer = client.stream.writer
    except (*_FAILURES, AttributeError):  # never connected ("Connect first")
        return
    with contextlib.suppress(*_FAILURES):
        await asyncio.wait_for(writer.wait_closed(), client.socket_timeout)
