"""Processes the benchmarks run: the daemon, the no-op server, wrk, sshd and moto.

Pinning (2 cores): everything measured (firehosed, the no-op server, in-process ceilings,
raw upload clients) runs on CPU 0 (`SERVER_CPU`); everything that produces load or
receives deliveries (wrk, the latency generator and webhook receiver, sshd, moto) on CPU
1 (`LOAD_CPU`). Threads inherit the pinning, so the daemon's fsync thread shares CPU 0.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else sys.executable
SERVER_CPU = "0"
LOAD_CPU = "1"
TOKEN = "bench-token"
ACCOUNT = "bench"


def pinned(cpu: str, argv: list[str]) -> list[str]:
    """`argv` under `taskset -c cpu` when the machine has a CPU of that number."""
    if shutil.which("taskset") and int(cpu) < (os.cpu_count() or 1):
        return ["taskset", "-c", cpu, *argv]
    return argv


def free_port() -> int:
    """A TCP port nobody listens on right now on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.01
) -> Any:
    """Poll `condition` until truthy; RuntimeError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of GET http://127.0.0.1:port/path; (0, b"") when nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def tree_rss_kib(pid: int) -> int:
    """rss_kib of a process and of every process under it (an import's reading child)."""
    total = 0
    for each in [pid, *descendants(pid)]:
        try:
            total += rss_kib(each)
        except (FileNotFoundError, ProcessLookupError, RuntimeError):  # ended meanwhile
            continue
    return total


def descendants(pid: int) -> list[int]:
    """The processes under `pid`, as /proc lists each thread's children."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children = [int(c) for c in task.read_text().split()]
        except FileNotFoundError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def write_bytes(pid: int) -> int:
    """Bytes a process has caused to be written to storage (/proc/PID/io write_bytes)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no write_bytes for pid {pid}")


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system) of a process, of the children it has reaped and of
    those running under it."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
    for each in descendants(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += sum(cpu_times(each))
    return total


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; reaps the process."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- firehosed --------------------------------------------------------------------------

CONFIG_HEAD = """
[server]
listen = "127.0.0.1:{port}"
max_body = "16MiB"
drain_timeout = "5s"

[admin]
listen = "127.0.0.1:{admin_port}"

[storage]
dir = "{root}/var"
durability = "fsync"

[catch_up]
max_memory = "{catch_up_memory}"

[accounts.{account}]
tokens = ["{token}"]
firehose_enabled = false
{account_keys}

[channels.local]
type = "directory"
path = "{root}/export"
"""


def firehose_toml(name: str, channel: str = "local", account: str = ACCOUNT, **keys: Any) -> str:
    """A `[firehoses.NAME]` table; `keys` are written as TOML values."""
    lines = [f"\n[firehoses.{name}]", f'account = "{account}"', f'channel = "{channel}"']
    for key, value in keys.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


class Daemon:
    """A `firehosed run` subprocess pinned to SERVER_CPU, with its config in `root`."""

    def __init__(
        self,
        root: Path,
        tables: str = "",
        *,
        catch_up_memory: str = "512MiB",
        account_keys: dict[str, Any] | None = None,
        cpu: str | None = SERVER_CPU,
    ) -> None:
        self.root = root
        self.cpu = cpu  # None: not pinned
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.admin_port = free_port()  # /metrics and /v1/status answer only there
        self.url = f"http://127.0.0.1:{self.port}"
        self.signals_url = f"{self.url}/v1/accounts/{ACCOUNT}/signals"
        self.config_path = root / "config.toml"
        self.log_path = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.write_config(
            CONFIG_HEAD.format(
                port=self.port,
                admin_port=self.admin_port,
                root=root,
                account=ACCOUNT,
                token=TOKEN,
                catch_up_memory=catch_up_memory,
                account_keys="".join(
                    f"{k} = {json.dumps(v)}\n" for k, v in (account_keys or {}).items()
                ),
            )
            + tables
        )

    def write_config(self, text: str) -> None:
        self.config_path.write_text(text)

    @property
    def argv(self) -> list[str]:
        argv = [PYTHON, "-m", "firehosed", "run", "-c", str(self.config_path)]
        return argv if self.cpu is None else pinned(self.cpu, argv)

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> Daemon:
        """Spawn the daemon (logging JSON lines to `log_path`); wait for /readyz 200."""
        with open(self.log_path, "ab") as log:
            self.started_at = time.time()
            self.proc = subprocess.Popen(
                self.argv, cwd=self.root, stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        if wait:
            wait_until(self.ready, timeout, "firehosed /readyz")
        return self

    def ready(self) -> bool:
        """/readyz answers 200; RuntimeError with the log if the process died."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"firehosed exited {self.proc.returncode}:\n{self.log_tail()}")
        return http_get(self.port, "/readyz")[0] == 200

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def metrics(self) -> dict[str, float]:
        """/metrics as {"name{labels}": value} (samples only)."""
        status, body = http_get(self.admin_port, "/metrics", timeout=10)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        values: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def accepted(self) -> float:
        return self.metrics().get(f'firehosed_signals_accepted_total{{account="{ACCOUNT}"}}', 0.0)

    def events(self, name: str) -> list[dict[str, Any]]:
        """Parsed JSON log lines whose event is `name`, in order."""
        found: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return found
        for line in self.log_path.read_text(errors="replace").splitlines():
            if f'"{name}"' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == name:
                found.append(entry)
        return found

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def check_no_errors(self) -> None:
        """RuntimeError if the daemon logged an error (a benchmark must not hide one)."""
        if not self.log_path.exists():
            return
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"level": "error"' in line or '"level":"error"' in line:
                raise RuntimeError(f"firehosed logged an error: {line}")

    def stop(self) -> None:
        terminate(self.proc, timeout=15)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def event_time(entry: dict[str, Any]) -> float:
    """Unix time of a structlog JSON event (`timestamp` ISO 8601, UTC)."""
    return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()


# -- the no-op ceiling server -----------------------------------------------------------


@dataclass
class NoopServer:
    """bench/noop_server.py in a subprocess pinned to SERVER_CPU."""

    port: int
    proc: subprocess.Popen[bytes]
    argv: list[str]

    @property
    def signals_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/accounts/{ACCOUNT}/signals"

    @classmethod
    def start(
        cls, relay: str | None = None, journal: Path | None = None, app: bool = False
    ) -> NoopServer:
        port = free_port()
        argv = pinned(SERVER_CPU, [PYTHON, "-m", "bench.noop_server", "--port", str(port)])
        if relay:
            argv += ["--relay", relay]
        if journal:
            argv += ["--journal", str(journal)]
        if app:
            argv.append("--app")
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL)
        server = cls(port, proc, argv)
        wait_until(server._up, 30, "no-op server")
        return server

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"no-op server exited {self.proc.returncode}")
        return http_get(self.port, "/healthz")[0] == 200

    def stop(self) -> None:
        terminate(self.proc)
