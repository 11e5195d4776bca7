"""`GET /v1/tail` and `firehosed tail`: live accepted signals and deliveries, a slow
reader losing (and being told about) events rather than holding anything back, and the
command under a real terminal (tmux): a signal shows within a second, Ctrl-C is clean."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.daemon import Daemon, signal_record, wait_until

FIREHOSES = """
[firehoses.files]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.01
types = ["pd"]

[firehoses.carts]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.01
types = ["c"]
prefix = "carts/"
"""


@contextmanager
def events(daemon: Daemon, query: str = "") -> Iterator[Iterator[dict[str, Any]]]:
    """The tail's events, parsed, as they come (subscribed once this is entered)."""
    url = f"{daemon.admin_url}/v1/tail{query}"
    with daemon.session.get(url, stream=True, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        yield (json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: "))


def test_tail_shows_accepted_signals_and_deliveries(make_daemon) -> None:
    daemon = make_daemon(FIREHOSES).start()
    with events(daemon) as stream:
        assert daemon.post([signal_record(7), signal_record(8, kind="c")]).status_code == 202
        first, second = next(stream), next(stream)
        delivered = [next(stream), next(stream)]
    assert {k: first[k] for k in ("event", "account", "type", "id", "firehoses")} == {
        "event": "accepted",
        "account": "acme",
        "type": "pd",
        "id": f"{7:024x}",
        "firehoses": ["files"],
    }
    assert (second["type"], second["firehoses"]) == ("c", ["carts"])
    assert {(e["event"], e["firehose"], e["records"]) for e in delivered} == {
        ("delivered", "files", 1),
        ("delivered", "carts", 1),
    }
    names = {str(p.relative_to(daemon.export)) for p in daemon.files()}
    assert {e["batch"] for e in delivered} <= names


def test_a_daemon_with_a_tail_open_stops_at_once_and_ends_the_stream(make_daemon) -> None:
    daemon = make_daemon(FIREHOSES).start()
    with events(daemon) as stream:
        started = time.monotonic()
        assert daemon.stop(timeout=10) == 0
        assert time.monotonic() - started < 5  # not aiohttp's 60 s shutdown wait
        assert list(stream) == []  # the stream ended (no error)


def test_tail_of_one_firehose_leaves_out_the_others(make_daemon) -> None:
    daemon = make_daemon(FIREHOSES).start()
    with events(daemon, "?firehose=carts") as stream:
        assert daemon.post([signal_record(1)]).status_code == 202  # files only
        assert daemon.post([signal_record(2, kind="c")]).status_code == 202
        first, second = next(stream), next(stream)
    assert (first["event"], first["id"]) == ("accepted", f"{2:024x}")
    assert (second["event"], second["firehose"]) == ("delivered", "carts")


def test_a_reader_that_does_not_read_loses_events_and_is_told_how_many(make_daemon) -> None:
    daemon = make_daemon(FIREHOSES.replace('types = ["pd"]', 'types = ["pd"]\npaused = true'))
    daemon.start()
    total = 30_000  # far more than the reader's queue (1024) and the socket buffers hold
    with socket.create_connection(("127.0.0.1", daemon.admin_port), timeout=30) as sock:
        sock.sendall(b"GET /v1/tail?firehose=files HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: sock.recv(4096, socket.MSG_PEEK))  # the answer's head: subscribed
        for start in range(0, total, 5000):  # under max_body
            batch = [signal_record(n) for n in range(start, start + 5000)]
            assert daemon.post(batch).status_code == 202
        assert daemon.status()["accepting"] is True  # the daemon goes on, unhindered
        assert daemon.post([signal_record(total)]).status_code == 202  # carries the notice
        last = f'"id":"{total:024x}"'.encode()
        received = b""
        deadline = time.monotonic() + 30
        while last not in received and time.monotonic() < deadline:
            received += sock.recv(1 << 16)
    data = [json.loads(line[6:]) for line in received.split(b"\n") if line.startswith(b"data: ")]
    accepted = [e for e in data if e["event"] == "accepted"]
    dropped = [e["dropped"] for e in data if e["event"] == "dropped"]
    assert dropped and sum(dropped) > 0
    assert len(accepted) + sum(dropped) == total + 1  # every event shown or counted
    assert accepted[-1]["id"] == f"{total:024x}"


TMUX = shutil.which("tmux")


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_firehosed_tail_in_a_terminal(make_daemon) -> None:
    daemon = make_daemon(FIREHOSES).start()
    session = f"firehosed-tail-{uuid.uuid4().hex[:8]}"
    command = shlex.join([sys.executable, "-m", "firehosed", "tail", "-c", str(daemon.config_path)])
    shell = f"{command}; echo EXIT=$?; sleep 60"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", shell],
        check=True,
        cwd=daemon.root,
    )

    def screen() -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-J", "-t", session],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    try:
        wait_until(lambda: "following" in screen())
        assert daemon.post([signal_record(42)]).status_code == 202
        wait_until(lambda: f"{42:024x}" in screen(), timeout=1.0, interval=0.02)
        line = next(x for x in screen().splitlines() if f"{42:024x}" in x)
        assert "accepted" in line and "acme pd" in line and "-> files" in line
        wait_until(lambda: "delivered files" in screen())
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        wait_until(lambda: "EXIT=" in screen(), timeout=10)
        text = screen()
        assert "EXIT=0" in text
        assert "Traceback" not in text and "KeyboardInterrupt" not in text
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_firehosed_status_is_coloured_only_on_a_terminal(make_daemon) -> None:
    daemon = make_daemon(FIREHOSES).start()
    session = f"firehosed-status-{uuid.uuid4().hex[:8]}"
    command = shlex.join(
        [sys.executable, "-m", "firehosed", "status", "-c", str(daemon.config_path)]
    )
    shell = f"{command}; echo EXIT=$?; sleep 60"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", shell],
        check=True,
        cwd=daemon.root,
    )
    try:

        def screen() -> str:
            return subprocess.run(
                ["tmux", "capture-pane", "-p", "-e", "-t", session],
                capture_output=True,
                text=True,
                check=True,
            ).stdout

        text = wait_until(lambda: "EXIT=" in (out := screen()) and out, timeout=20)
        assert "EXIT=0" in text
        row = next(line for line in text.splitlines() if line.startswith("files "))
        assert "\033[32m" in row and "delivering" in row  # green on a terminal
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    piped = daemon.cli("status")
    assert piped.returncode == 0 and "\033[" not in piped.stdout
