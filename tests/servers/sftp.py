"""Real SFTP servers for the sftp channel tests.

Two servers: asyncssh's own SFTP server, run in the test's event loop and rooted at a
temp directory, and OpenSSH `sshd` run as a subprocess with its own config, host key
and authorized key on a free port. Both count the SSH connections they accept, so tests
can tell whether the channel reused its connection.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest

SSHD = "/usr/sbin/sshd"
USERNAME = "firehose"
PASSWORD = "correct horse battery staple"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ClientKey:
    """A client key pair: the private key as OpenSSH text, the public key line."""

    private: str
    public: str

    @classmethod
    def generate(cls) -> ClientKey:
        key = asyncssh.generate_private_key("ssh-ed25519")
        return cls(
            private=key.export_private_key().decode(),
            public=key.export_public_key().decode().strip(),
        )


@dataclass
class AsyncsshSftpServer:
    """asyncssh's SFTP server rooted at `root`: `/` on the wire is `root` on disk."""

    root: Path
    host_key: asyncssh.SSHKey
    client_key: ClientKey
    port: int = 0
    connections: int = 0

    @property
    def known_hosts(self) -> str:
        """An OpenSSH known_hosts line for this server's host key."""
        public = self.host_key.export_public_key().decode().strip()
        return f"[127.0.0.1]:{self.port} {public}\n"

    @property
    def fingerprint(self) -> str:
        return str(self.host_key.get_fingerprint("sha256"))


class _CountingServer(asyncssh.SSHServer):
    """Counts accepted connections and accepts USERNAME / PASSWORD."""

    def __init__(self, state: AsyncsshSftpServer) -> None:
        self.state = state

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.state.connections += 1

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == USERNAME and password == PASSWORD


def _rooted_sftp_server(root: Path) -> type[asyncssh.SFTPServer]:
    class RootedSFTPServer(asyncssh.SFTPServer):
        """An SFTP server that sees only `root`."""

        def __init__(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
            super().__init__(chan, chroot=os.fsencode(root))

    return RootedSFTPServer


@asynccontextmanager
async def asyncssh_sftp_server(root: Path) -> AsyncIterator[AsyncsshSftpServer]:
    """Run asyncssh's SFTP server on a free port; password and client key auth.

    `root` must exist; the server maps `/` to it.
    """
    state = AsyncsshSftpServer(
        root=root,
        host_key=asyncssh.generate_private_key("ssh-ed25519"),
        client_key=ClientKey.generate(),
    )
    acceptor = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[state.host_key],
        authorized_client_keys=asyncssh.import_authorized_keys(state.client_key.public),
        server_factory=lambda: _CountingServer(state),
        sftp_factory=_rooted_sftp_server(root),
        allow_scp=False,
    )
    state.port = acceptor.get_port()
    try:
        yield state
    finally:
        acceptor.close()
        await acceptor.wait_closed()


def require_sshd() -> None:
    """Skip (locally) or fail (in CI) when OpenSSH's sshd is not installed."""
    if os.access(SSHD, os.X_OK) and shutil.which("ssh-keygen"):
        return
    reason = f"OpenSSH server not installed ({SSHD}): apt-get install openssh-server"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class OpensshServer:
    """OpenSSH sshd with its own config in `home`, serving SFTP through internal-sftp.

    Paths on the wire are real paths on this machine (no chroot). `stop()` kills the
    listener and every per-connection child, as a crash or a reboot of the host would.
    """

    home: Path
    port: int
    client_key: ClientKey
    username: str = field(default_factory=getpass.getuser)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.home / "sshd.log"

    @property
    def host_key_file(self) -> Path:
        return self.home / "ssh_host_ed25519_key"

    @property
    def known_hosts(self) -> str:
        public = (self.home / "ssh_host_ed25519_key.pub").read_text().strip()
        return f"[127.0.0.1]:{self.port} {public}\n"

    @property
    def fingerprint(self) -> str:
        """The host key's fingerprint exactly as `ssh-keygen -lf` prints it."""
        out = subprocess.run(
            ["ssh-keygen", "-lf", str(self.host_key_file)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.split()[1]

    def write_config(self) -> Path:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key_file)],
            check=True,
        )
        (self.home / "authorized_keys").write_text(self.client_key.public + "\n")
        config = self.home / "sshd_config"
        config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key_file}\n"
            f"PidFile {self.home / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.home / 'authorized_keys'}\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "Subsystem sftp internal-sftp\n"
            "LogLevel INFO\n"
        )
        return config

    def start(self) -> None:
        """Start sshd in the foreground (-D), logging to `log`, and wait until it listens."""
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.home / "sshd_config")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 10
        while b"Server listening" not in self.log.read_bytes()[offset:]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not start: {self.log.read_text()}")
            time.sleep(0.01)

    def accepted_connections(self) -> int:
        """How many client logins sshd has accepted since it was first started."""
        return self.log.read_text().count("Accepted publickey")

    def children(self) -> list[int]:
        """Every live descendant of the sshd listener (one tree per client connection)."""
        assert self.process is not None
        return _descendants(self.process.pid)

    def kill_connections(self) -> None:
        """Kill every per-connection sshd process and wait until they are gone.

        The listener keeps running. This blocks the event loop on purpose: a client in
        the same loop cannot notice the drop before its next request.
        """
        pids = self.children()
        for pid in pids:
            _kill(pid)
        deadline = time.monotonic() + 10
        while set(pids) & set(self.children()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd children still alive: {pids}")
            time.sleep(0.005)

    def stop(self) -> None:
        """Kill the listener and its children at once (SIGKILL: no goodbye to clients)."""
        if self.process is None:
            return
        pids = self.children()
        self.process.kill()
        for pid in pids:
            _kill(pid)
        self.process.wait()
        self.process = None


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; ppid follows the state.
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def _kill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def openssh_server(tmp_path: Path) -> Iterator[OpensshServer]:
    """A running OpenSSH sshd accepting a generated client key for the current user."""
    require_sshd()
    home = tmp_path / "sshd"
    home.mkdir()
    server = OpensshServer(home=home, port=free_port(), client_key=ClientKey.generate())
    server.write_config()
    server.start()
    try:
        yield server
    finally:
        server.stop()
