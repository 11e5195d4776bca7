"""Run a real `firehosed run` process for black-box tests, and talk HTTP to it."""

from __future__ import annotations

import gzip as gzip_module
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

FIXTURES = Path(__file__).parent / "fixtures"
TOKEN = "test-token"

BASE_CONFIG = """
[server]
listen = "127.0.0.1:{port}"
max_body = "1MiB"
drain_timeout = "10s"

[storage]
dir = "{dir}/var"

[accounts.acme]
tokens = ["{token}"]

[channels.local]
type = "directory"
path = "{dir}/export"

[fallback]
channel = "local"
"""

# Appended to a config that has no [admin] table: every test daemon gets its own free
# admin port (the default 8081 would clash between tests running side by side).
ADMIN_CONFIG = """
[admin]
listen = "127.0.0.1:{admin_port}"
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def delivered_records(paths: list[Path]) -> list[dict[str, Any]]:
    """Every record of the NDJSON files at `paths` (gunzipped where named .gz)."""
    records = []
    for path in paths:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip_module.decompress(data)
        records += [json.loads(line) for line in data.splitlines() if line]
    return records


class Daemon:
    """A firehosed subprocess with its own temp dir, config and port."""

    def __init__(self, root: Path, extra_config: str = "", base: str = BASE_CONFIG) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_port = free_port()
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        # Sent to the admin listener when set (a test whose config sets [admin] token).
        self.admin_token: str | None = None
        self.config_path = root / "config.toml"
        self.export = root / "export"
        self.log_path = root / "daemon.log"
        self.write_config(extra_config, base)
        self.proc: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()

    def write_config(self, extra_config: str = "", base: str = BASE_CONFIG) -> None:
        """(Re)write the config file: the base plus `extra_config` (plus an [admin]
        table on this daemon's admin port, unless the text has one)."""
        text = base.format(port=self.port, dir=self.root, token=TOKEN) + extra_config
        if "[admin]" not in text:
            text += ADMIN_CONFIG.format(admin_port=self.admin_port)
        self.config_path.write_text(text)

    def start(self, *, wait: bool = True, env: dict[str, str] | None = None) -> Daemon:
        """Start the process (extra `env` vars) and wait until /readyz answers 200."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "firehosed", "run", "-c", str(self.config_path)],
            cwd=self.root,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        log.close()
        if wait:
            wait_until(self.ready, timeout=20)
        return self

    def ready(self) -> bool:
        """Whether /readyz answers 200 (fails at once if the process died)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
        try:
            return self.session.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def post(
        self,
        body: bytes | str | Any,
        *,
        account: str = "acme",
        token: str | None = TOKEN,
        content_type: str | None = "application/json",
        gzip: bool = False,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        """POST signals; `body` may be bytes, text, or a JSON-able value."""
        if not isinstance(body, bytes | str):
            body = json.dumps(body)
        data = body.encode() if isinstance(body, str) else body
        sent = dict(headers or {})
        if content_type is not None:
            sent["Content-Type"] = content_type
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if gzip:
            data = gzip_module.compress(data)
            sent["Content-Encoding"] = "gzip"
        return self.session.post(
            f"{self.url}/v1/accounts/{account}/signals", data=data, headers=sent, timeout=30
        )

    def get(self, path: str) -> requests.Response:
        """GET on the ingest listener (what sources and load balancers reach)."""
        return self.session.get(f"{self.url}{path}", timeout=10)

    def admin(self, path: str, method: str = "GET", **kwargs: Any) -> requests.Response:
        """A request to the admin listener, with `admin_token` when set."""
        headers = dict(kwargs.pop("headers", None) or {})
        if self.admin_token is not None:
            headers.setdefault("Authorization", f"Bearer {self.admin_token}")
        return self.session.request(
            method, f"{self.admin_url}{path}", headers=headers, timeout=10, **kwargs
        )

    def status(self) -> dict[str, Any]:
        """The admin listener's /v1/status document."""
        response = self.admin("/v1/status")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def cli(
        self, *command: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `firehosed <command> -c <this config>` to completion (e.g. "replay"),
        with extra `env` vars."""
        return subprocess.run(
            [sys.executable, "-m", "firehosed", *command, "-c", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, **(env or {})},
        )

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, no cleanup."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def files(self, pattern: str = "**/*") -> list[Path]:
        """Delivered files (no temp files), sorted by name."""
        if not self.export.exists():
            return []
        return sorted(
            p for p in self.export.glob(pattern) if p.is_file() and not p.name.startswith(".")
        )

    def delivered(self, pattern: str = "**/*.ndjson") -> list[dict[str, Any]]:
        """Every record of every delivered NDJSON file."""
        return delivered_records(self.files(pattern))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Parsed JSON log lines, optionally only those with `event == name`."""
        found = []
        for line in self.log_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and (name is None or entry.get("event") == name):
                found.append(entry)
        return found

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.session.close()


def signal_record(
    n: int, *, kind: str = "pd", session: str | None = None, person: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A signal shaped like the fixtures (ids as $oid, times as $date)."""
    record: dict[str, Any] = {
        "signal_id": {"$oid": f"{n:024x}"},
        "type": kind,
        "evdt": {"$date": "2026-11-23T10:00:00.000Z"},
    }
    if session is not None:
        record["did"] = session
    if person is not None:
        record["pid"] = person
    record.update(extra)
    return record
