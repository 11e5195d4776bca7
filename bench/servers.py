"""Destination servers for the upload benchmarks: OpenSSH sshd and moto, on the load CPU."""

from __future__ import annotations

import asyncio
import getpass
import os
import subprocess
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncssh
from aiobotocore.session import AioSession

from bench.procs import LOAD_CPU, PYTHON, free_port, pinned, terminate, wait_until
from tests.faults.proxy import FaultProxy

SSHD = "/usr/sbin/sshd"


class Missing(RuntimeError):
    """A server binary is not installed."""


@dataclass
class Sshd:
    """OpenSSH sshd (internal-sftp, key auth for the current user) with its files in `home`."""

    home: Path
    port: int
    proc: subprocess.Popen[bytes]
    key_file: Path
    known_hosts_file: Path
    username: str

    @classmethod
    def start(cls, home: Path) -> Sshd:
        if not os.access(SSHD, os.X_OK):
            raise Missing(f"{SSHD} not installed (apt-get install openssh-server)")
        home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        host_key = home / "host_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True
        )
        client = asyncssh.generate_private_key("ssh-ed25519")
        key_file = home / "client_key"
        key_file.write_bytes(client.export_private_key())
        key_file.chmod(0o600)
        (home / "authorized_keys").write_bytes(client.export_public_key())
        known = home / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {(home / 'host_ed25519.pub').read_text().strip()}\n")
        config = home / "sshd_config"
        config.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"PidFile {home / 'sshd.pid'}\nAuthorizedKeysFile {home / 'authorized_keys'}\n"
            "StrictModes no\nUsePAM no\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "Subsystem sftp internal-sftp\nLogLevel INFO\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        with open(home / "sshd.log", "wb") as log:
            proc = subprocess.Popen(
                pinned(LOAD_CPU, [SSHD, "-D", "-e", "-f", str(config)]), stdout=log, stderr=log
            )
        server = cls(home, port, proc, key_file, known, getpass.getuser())
        wait_until(
            lambda: (
                b"Server listening" in (home / "sshd.log").read_bytes() or proc.poll() is not None
            ),
            10,
            "sshd to listen",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {(home / 'sshd.log').read_text()}")
        return server

    def channel_toml(self, name: str, path: Path) -> str:
        """A `[channels.NAME]` table uploading into `path` on this server."""
        return (
            f'\n[channels.{name}]\ntype = "sftp"\nhost = "127.0.0.1"\nport = {self.port}\n'
            f'username = "{self.username}"\nprivate_key_file = "{self.key_file}"\n'
            f'known_hosts_file = "{self.known_hosts_file}"\npath = "{path}"\n'
        )

    def stop(self) -> None:
        terminate(self.proc)


@dataclass
class Moto:
    """`python -m moto.server` on a free port."""

    url: str
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(cls) -> Moto:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            pinned(LOAD_CPU, [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        server = cls(url, proc)
        wait_until(server._up, 30, "moto server", interval=0.05)
        return server

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"moto server exited {self.proc.returncode}")
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def create_bucket(self, bucket: str, objects: dict[str, bytes] | None = None) -> None:
        """Create `bucket`, holding `objects` (key: bytes)."""
        asyncio.run(self._create_bucket(bucket, objects or {}))

    async def _create_bucket(self, bucket: str, objects: dict[str, bytes]) -> None:
        async with AioSession().create_client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ) as client:
            await client.create_bucket(Bucket=bucket)
            for key, body in objects.items():
                await client.put_object(Bucket=bucket, Key=key, Body=body)

    def channel_toml(self, name: str, bucket: str, url: str | None = None) -> str:
        """A `[channels.NAME]` table putting objects into `bucket` on this server (reached
        at `url`, if given: a `Link` to it)."""
        return (
            f'\n[channels.{name}]\ntype = "s3"\nbucket = "{bucket}"\n'
            f'endpoint_url = "{url or self.url}"\n'
            'access_key_id = "testing"\nsecret_access_key = "testing"\n'
        )

    def stop(self) -> None:
        terminate(self.proc)


class Link:
    """A server across a network of `rate` bytes a second each way: a FaultProxy
    (tests/faults/proxy.py), slowed, in front of `upstream`, in a thread of its own.
    Clients connect to `url`."""

    def __init__(self, upstream: str, rate: int) -> None:
        parts = urlsplit(upstream)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="link", daemon=True)
        self._thread.start()
        self._proxy = FaultProxy(parts.hostname or "127.0.0.1", parts.port or 80)
        asyncio.run_coroutine_threadsafe(self._proxy.slow(rate), self._loop).result(10)
        self.url = f"http://{self._proxy.address}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._proxy.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
