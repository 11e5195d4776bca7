"""The sd_notify client against real datagram sockets, and the unit file against systemd's tools."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from firehosed.config import AccountConfig, CatchUpConfig, FirehoseConfig, ServerConfig
from firehosed.systemd import Notifier

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "firehosed.service"
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
NO_MDWE = 77  # the wrapper's exit status when the kernel lacks PR_SET_MDWE


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket, named by NOTIFY_SOCKET, as systemd provides it."""
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    # A short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path is long.
    with tempfile.TemporaryDirectory(prefix="sdnotify") as tmp:
        path = os.path.join(tmp, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(2)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound abstract-namespace datagram socket, named `@name` in NOTIFY_SOCKET."""
    name = f"firehosed-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def assert_nothing_pending(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_ready_sends_ready_and_status(notify_socket: socket.socket) -> None:
    Notifier.from_environ().ready()
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving"


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda n: n.ready("serving 3 firehoses"), b"READY=1\nSTATUS=serving 3 firehoses"),
        (lambda n: n.reloaded(), b"READY=1\nSTATUS=serving"),
        (lambda n: n.stopping(), b"STOPPING=1\nSTATUS=draining"),
        (lambda n: n.status("draining: 2 batches left"), b"STATUS=draining: 2 batches left"),
        # A newline would start a new KEY=VALUE line: it is flattened to a space.
        (lambda n: n.status("backlog\nREADY=1"), b"STATUS=backlog READY=1"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
    ],
)
def test_each_message_is_one_exact_datagram(
    notify_socket: socket.socket, call: Callable[[Notifier], None], expected: bytes
) -> None:
    call(Notifier.from_environ())
    assert notify_socket.recv(4096) == expected
    assert_nothing_pending(notify_socket)


def test_reloading_carries_the_monotonic_time(notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier.from_environ().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = notify_socket.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[2] == "STATUS=reloading configuration"
    key, _, usec = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after


def test_abstract_socket(abstract_socket: socket.socket) -> None:
    notifier = Notifier.from_environ()
    notifier.ready()
    notifier.stopping()
    assert abstract_socket.recv(4096) == b"READY=1\nSTATUS=serving"
    assert abstract_socket.recv(4096) == b"STOPPING=1\nSTATUS=draining"


def test_notify_socket_stays_in_the_environment(notify_socket: socket.socket) -> None:
    path = os.environ["NOTIFY_SOCKET"]
    Notifier.from_environ().ready()
    assert os.environ["NOTIFY_SOCKET"] == path
    Notifier.from_environ().stopping()
    assert notify_socket.recv(4096).startswith(b"READY=1")
    assert notify_socket.recv(4096).startswith(b"STOPPING=1")


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("200000", "self", 0.1),
        ("30000000", "1", None),  # meant for another process
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    notify_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    usec: str | None,
    pid: str | None,
    expected: float | None,
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert Notifier.from_environ().watchdog_interval() == expected


async def test_run_watchdog_pings_every_half_watchdog_usec(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notify_socket.setblocking(False)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(Notifier.from_environ().run_watchdog())
    try:
        started = time.monotonic()
        arrivals = []
        for _ in range(4):
            message = await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), 2)
            assert message == b"WATCHDOG=1"
            arrivals.append(time.monotonic() - started)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert arrivals[0] < 0.05  # the first ping goes out at once
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(0.09 <= gap < 0.5 for gap in gaps), gaps


@pytest.mark.parametrize("pid", ["1", None])
async def test_run_watchdog_returns_at_once_without_a_watchdog(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch, pid: str | None
) -> None:
    if pid is not None:  # WatchdogSec= set, but for another process
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        monkeypatch.setenv("WATCHDOG_PID", pid)
    await asyncio.wait_for(Notifier.from_environ().run_watchdog(), 1)
    assert_nothing_pending(notify_socket)


async def test_without_notify_socket_every_call_is_a_silent_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    notifier = Notifier.from_environ()
    with capture_logs() as logs:
        notifier.ready()
        notifier.reloading()
        notifier.reloaded()
        notifier.status("x")
        notifier.watchdog()
        notifier.stopping()
        await asyncio.wait_for(notifier.run_watchdog(), 1)
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert logs == []


def test_send_failure_is_logged_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory(prefix="sdnotify") as tmp:
        monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(tmp, "gone"))
        with capture_logs() as logs:
            Notifier.from_environ().ready()
    assert len(logs) == 1
    assert logs[0]["event"] == "systemd.notify_failed"
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["message"] == "READY=1"
    assert logs[0]["error"].startswith("FileNotFoundError")


@pytest.mark.timeout(10)
def test_a_full_socket_never_blocks_the_sender(notify_socket: socket.socket) -> None:
    """systemd not reading (hung, or busy) must not stall the event loop."""
    notifier = Notifier.from_environ()
    with capture_logs() as logs:
        for _ in range(2000):
            notifier.watchdog()
            if logs:
                break
    assert logs, "2000 unread datagrams were all queued: nothing ever filled up"
    assert logs[0]["event"] == "systemd.notify_failed"
    assert logs[0]["error"].startswith("BlockingIOError")
    assert notify_socket.recv(4096) == b"WATCHDOG=1"


def test_unsupported_socket_address_disables_notify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with capture_logs() as logs:
        notifier = Notifier.from_environ()
        notifier.ready()
    assert not notifier.enabled
    assert [entry["event"] for entry in logs] == ["systemd.notify_unsupported"]


def systemd_analyze() -> str:
    """Path of systemd-analyze; skip without it (fail under CI, which must install it)."""
    path = shutil.which("systemd-analyze")
    if path is None:
        reason = "systemd-analyze is not installed (Debian package: systemd)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def test_unit_file_verifies_cleanly(tmp_path: Path) -> None:
    """`systemd-analyze verify` works without systemd as PID 1; any message is a finding.

    ExecStart= names where `pip install` puts the console script, absent here, so the
    copy runs this interpreter instead; every other line is verified as shipped.
    """
    analyze = systemd_analyze()
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/firehosed run " in text
    unit = tmp_path / "firehosed.service"
    unit.write_text(
        text.replace(
            "ExecStart=/usr/local/bin/firehosed ", f"ExecStart={sys.executable} -m firehosed "
        )
    )
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings (exit status 0): none is allowed.
    assert result.stdout + result.stderr == ""


def test_unit_file_exposure_is_at_most_3(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"systemd-analyze security --offline is not supported: {result.stderr}")
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for firehosed\.service: (\d+\.\d)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= 3.0, result.stdout


def unit_settings() -> dict[str, str]:
    """The unit's `Key=value` lines (the last one of a key wins, as in systemd)."""
    settings = {}
    for line in UNIT.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", ";", "[")):
            settings[key.strip()] = value.strip()
    return settings


def test_unit_memory_max_fits_the_default_budget() -> None:
    """MemoryMax= (a hard ceiling: past it the kernel kills the daemon) holds what the
    defaults let the daemon hold, as the unit's comment derives it: the interpreter,
    catch-up's max_memory (charged in real bytes, +10% for the allocator), one account's
    dedupe_max ids at the 256-byte id limit, one file cut (max_file of records and their
    encoded bytes), and one max_body body split into tiny records (66 times its size:
    265 MiB for 4 MiB of `[1,1,…]`, tests/faults/RESULTS.md). Raising a default without
    raising MemoryMax fails here."""
    settings = unit_settings()
    assert "MemoryMax" in settings, "no MemoryMax= in the unit"
    value = settings["MemoryMax"]
    shift = {"K": 10, "M": 20, "G": 30, "T": 40}.get(value[-1])
    memory_max = int(value[:-1]) << shift if shift else int(value)
    budget = (
        (64 << 20)
        + CatchUpConfig().max_memory * 1.1
        + AccountConfig().dedupe_max * 384
        + 2 * FirehoseConfig(account="a", channel="c").max_file
        + 66 * ServerConfig().max_body
    )
    assert budget <= memory_max <= 2 * budget, (budget, memory_max)


def test_unit_tasks_max_leaves_room_for_every_thread_and_bounds_a_leak() -> None:
    """Threads: the event loop, asyncio's default executor (at most 32), libuv's pool
    (4), a reload's `kill`; TasksMax= must allow them all, and still be a limit."""
    tasks_max = int(unit_settings().get("TasksMax", "0"))
    assert 1 + 32 + 4 + 8 <= tasks_max <= 1024, tasks_max


# Run inside a process the kernel forbids writable+executable memory, as systemd's
# MemoryDenyWriteExecute=yes does: import every runtime dependency and exercise the
# native ones (uvloop, aiohttp over TLS, msgspec, cryptography, asyncssh).
MDWE_CHILD = textwrap.dedent(
    """
    import asyncio, mmap, ssl
    import aiobotocore.session, aioftp, aiohttp, aiosmtplib, asyncssh, msgspec
    import prometheus_client, structlog, trustme, uvloop
    from aiohttp import web
    import firehosed.config, firehosed.metrics, firehosed.systemd
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        raise SystemExit("W+X memory was allowed: the restriction is not in force")
    except OSError:
        pass

    async def echo(request):
        return web.Response(body=await request.read())

    async def main():
        ca = trustme.CA()
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        app = web.Application()
        app.router.add_post("/", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        port = runner.addresses[0][1]
        body = msgspec.json.encode({"signals": list(range(1000))})
        async with aiohttp.ClientSession() as session:
            async with session.post(f"https://127.0.0.1:{port}/", data=body, ssl=client_ctx) as r:
                assert await r.read() == body
        await runner.cleanup()
        key = asyncssh.generate_private_key("ssh-ed25519")
        assert asyncssh.import_private_key(key.export_private_key()).public_data == key.public_data
        signer = Ed25519PrivateKey.generate()
        signer.public_key().verify(signer.sign(b"batch"), b"batch")
        await asyncio.to_thread(lambda: None)

    uvloop.run(main())
    print("ok")
    """
)


def test_runtime_works_under_memory_deny_write_execute() -> None:
    """The unit sets MemoryDenyWriteExecute=yes: prove the daemon's stack survives it.

    prctl(PR_SET_MDWE) (Linux >= 6.3) is what systemd >= 253 itself uses for the setting;
    it survives execve, so the child interpreter runs entirely under it.
    """
    wrapper = (
        "import ctypes, os, sys\n"
        f"if ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0):\n"
        f"    sys.exit({NO_MDWE})\n"
        "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", wrapper, MDWE_CHILD],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode == NO_MDWE:
        pytest.skip(f"kernel {os.uname().release} lacks prctl(PR_SET_MDWE) (Linux >= 6.3)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
