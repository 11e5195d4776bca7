"""Real FTP servers for the ftp and ftpes channel tests.

Two servers: pyftpdlib run in a thread, plain or with explicit TLS required on both the
control and the data connections, with a password user and a read-only user; and
vsftpd run as a subprocess with its own config on a free port, TLS forced and
`require_ssl_reuse=YES`, so a data connection that does not resume the control
connection's TLS session is refused. Certificates come from `trustme`.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

with warnings.catch_warnings():
    # pyftpdlib runs on asyncore/asynchat, deprecated on Python 3.11 (it ships its own
    # copies for 3.12+): a warning about the test server, not about firehosed.
    warnings.filterwarnings("ignore", r"The async\w+ module is deprecated", DeprecationWarning)
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.filesystems import AbstractedFS
    from pyftpdlib.handlers import FTPHandler, TLS_FTPHandler
    from pyftpdlib.servers import FTPServer

VSFTPD = "/usr/sbin/vsftpd"
USERNAME = "firehose"
PASSWORD = "correct horse battery staple"
READER = "reader"
READER_PASSWORD = "read only please"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerCert:
    """A server certificate for 127.0.0.1 and localhost: PEM files on disk."""

    cert: Path  # the certificate chain
    key: Path

    @classmethod
    def issue(cls, ca: trustme.CA, directory: Path) -> ServerCert:
        directory.mkdir(parents=True, exist_ok=True)
        issued = ca.issue_cert("127.0.0.1", "localhost")
        cert, key = directory / "server-cert.pem", directory / "server-key.pem"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        return cls(cert=cert, key=key)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A test certificate authority (fixture; import it into a test module)."""
    return trustme.CA()


@pytest.fixture(scope="module")
def server_cert(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    """A server certificate from `ca` for 127.0.0.1 (fixture)."""
    return ServerCert.issue(ca, tmp_path_factory.mktemp("ftp-tls"))


def ca_pem(ca: trustme.CA) -> str:
    """The CA certificate as PEM text, as the config loader puts it in `ca`."""
    return ca.cert_pem.bytes().decode()


@dataclass
class PyftpdServer:
    """pyftpdlib serving `home` on 127.0.0.1; records the commands and connections it saw.

    USERNAME may do anything under `home`; READER may only list and download.
    """

    home: Path
    port: int = 0
    commands: list[str] = field(default_factory=list)
    connections: int = 0
    disconnections: int = 0


class _NoOverwriteFS(AbstractedFS):  # type: ignore[misc]
    """Refuses to rename onto an existing file, as Windows and some FTP servers do."""

    def rename(self, src: str, dst: str) -> None:
        if os.path.exists(dst):
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        super().rename(src, dst)


@dataclass
class _Quirks:
    """How a test server departs from pyftpdlib's defaults."""

    idle_timeout: float
    refuse_overwrite: bool
    lose_last_byte: bool


def _handler(state: PyftpdServer, cert: ServerCert | None, quirks: _Quirks) -> type[Any]:
    authorizer = DummyAuthorizer()
    authorizer.add_user(USERNAME, PASSWORD, str(state.home), perm="elradfmwMT")
    authorizer.add_user(READER, READER_PASSWORD, str(state.home), perm="elr")
    base: type[Any] = FTPHandler if cert is None else TLS_FTPHandler

    class Handler(base):  # type: ignore[misc]
        """Counts connections and records every command received."""

        def on_connect(self) -> None:
            state.connections += 1

        def on_disconnect(self) -> None:
            state.disconnections += 1

        def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
            state.commands.append(cmd)
            super().pre_process_command(line, cmd, arg)

        def on_file_received(self, file: str) -> None:
            if quirks.lose_last_byte:
                os.truncate(file, max(0, os.path.getsize(file) - 1))

    Handler.authorizer = authorizer
    Handler.timeout = quirks.idle_timeout
    # pyftpdlib makes a failed login wait 3 s (slowing brute force); tests need no delay.
    Handler.auth_failed_timeout = 0.05
    if quirks.refuse_overwrite:
        Handler.abstracted_fs = _NoOverwriteFS
    if cert is not None:
        Handler.certfile = str(cert.cert)
        Handler.keyfile = str(cert.key)
        Handler.tls_control_required = True
        Handler.tls_data_required = True
    return Handler


@contextmanager
def pyftpd_server(
    home: Path,
    cert: ServerCert | None = None,
    *,
    idle_timeout: float = 300.0,
    refuse_overwrite: bool = False,
    lose_last_byte: bool = False,
) -> Iterator[PyftpdServer]:
    """Run pyftpdlib in a thread on a free port: TLS required when `cert` is given.

    `idle_timeout` is the control connection's idle timeout: the server then answers
    421 and hangs up, as production servers do. `refuse_overwrite` makes RNTO onto an
    existing file fail with 550. `lose_last_byte` cuts every upload short by one byte
    once received, as a data connection dropped early would (plain FTP cannot tell).
    """
    home.mkdir(parents=True, exist_ok=True)
    state = PyftpdServer(home=home)
    quirks = _Quirks(idle_timeout, refuse_overwrite, lose_last_byte)
    server = FTPServer(("127.0.0.1", 0), _handler(state, cert, quirks))
    state.port = server.address[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            server.serve_forever(timeout=0.05, blocking=False, handle_exit=False)
        server.close_all()

    thread = threading.Thread(target=serve, name="pyftpdlib", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join(10)


def require_vsftpd() -> None:
    """Skip (locally) or fail (in CI) when vsftpd cannot run here."""
    reason = None
    if not os.access(VSFTPD, os.X_OK):
        reason = f"vsftpd not installed ({VSFTPD}): apt-get install vsftpd"
    elif os.geteuid() != 0:
        reason = "vsftpd needs root (it chroots and drops privileges per session)"
    else:
        try:
            pwd.getpwnam("ftp")
        except KeyError:
            reason = "vsftpd's anonymous user 'ftp' does not exist"
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class VsftpdServer:
    """vsftpd on 127.0.0.1:`port`; anonymous login over TLS, uploads under `/upload`.

    `upload` is that directory on disk; `log` is vsftpd's protocol and TLS debug log.
    """

    port: int
    upload: Path
    log: Path


_VSFTPD_CONF = """\
listen=YES
listen_ipv6=NO
listen_address=127.0.0.1
listen_port={port}
background=NO
# Anonymous uploads: no system account to create for the test.
anonymous_enable=YES
local_enable=NO
no_anon_password=YES
write_enable=YES
anon_upload_enable=YES
anon_mkdir_write_enable=YES
anon_other_write_enable=YES
anon_umask=022
anon_root={home}
# TLS everywhere, and data connections must resume the control connection's session.
ssl_enable=YES
allow_anon_ssl=YES
force_anon_logins_ssl=YES
force_anon_data_ssl=YES
force_local_logins_ssl=YES
force_local_data_ssl=YES
require_ssl_reuse=YES
rsa_cert_file={cert}
rsa_private_key_file={key}
pasv_enable=YES
pasv_min_port={pasv_min}
pasv_max_port={pasv_max}
connect_from_port_20=NO
secure_chroot_dir={empty}
# Containers commonly forbid the syscalls the seccomp sandbox and the namespaces need.
seccomp_sandbox=NO
isolate=NO
isolate_network=NO
xferlog_enable=YES
vsftpd_log_file={log}
log_ftp_protocol=YES
debug_ssl=YES
"""


@contextmanager
def vsftpd_server(root: Path, cert: ServerCert) -> Iterator[VsftpdServer]:
    """Start vsftpd with its own config under `root`; stop it on exit.

    Call `require_vsftpd()` first. The anonymous root is owned by root and not
    writable (vsftpd refuses a writable chroot); `upload/` inside it belongs to `ftp`.
    """
    home, empty = root / "home", root / "empty"
    upload = home / "upload"
    for directory in (home, empty, upload):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
    ftp_user = pwd.getpwnam("ftp")
    os.chown(upload, ftp_user.pw_uid, ftp_user.pw_gid)
    port = pasv = free_port()
    while pasv == port:
        pasv = free_port()
    server = VsftpdServer(port=port, upload=upload, log=root / "vsftpd.log")
    conf = root / "vsftpd.conf"
    conf.write_text(
        _VSFTPD_CONF.format(
            port=port,
            home=home,
            cert=cert.cert,
            key=cert.key,
            # One passive port is enough for one client transferring sequentially.
            pasv_min=pasv,
            pasv_max=pasv,
            empty=empty,
            log=server.log,
        )
    )
    output = (root / "vsftpd.out").open("wb")
    process = subprocess.Popen([VSFTPD, str(conf)], stdout=output, stderr=subprocess.STDOUT)
    try:
        _wait_for_banner(process, port, root / "vsftpd.out")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output.close()


def _wait_for_banner(process: subprocess.Popen[bytes], port: int, output: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vsftpd exited {process.returncode}: {output.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(64).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"vsftpd did not answer on port {port}: {output.read_text()}")


__all__ = [
    "PASSWORD",
    "READER",
    "READER_PASSWORD",
    "USERNAME",
    "PyftpdServer",
    "ServerCert",
    "VsftpdServer",
    "ca_pem",
    "free_port",
    "pyftpd_server",
    "require_vsftpd",
    "vsftpd_server",
]
