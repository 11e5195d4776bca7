"""The systemd notify protocol (`sd_notify(3)`): readiness, reload, stop and watchdog.

systemd passes `NOTIFY_SOCKET` (a socket path, or `@name` for an abstract socket) and,
with `WatchdogSec=`, `WATCHDOG_USEC` and `WATCHDOG_PID`. Each notification is one
datagram of `KEY=VALUE` lines. Without `NOTIFY_SOCKET` (not run by systemd, or a unit
that is not `Type=notify`) every call is a no-op, so the daemon calls these
unconditionally.

`NOTIFY_SOCKET` is read, never removed from `os.environ`: libsystemd's
`unset_environment` exists to stop children from speaking for the service, but
firehosed starts no children that speak sd_notify, systemd accepts messages only from
the main process anyway (`NotifyAccess=main`, the default for `Type=notify`), and
keeping it lets a second `Notifier.from_environ()` (a test, a future re-exec) still work.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """Sends sd_notify datagrams to systemd; every method is a no-op without a socket.

    A fresh non-blocking datagram socket is opened per message, as libsystemd does:
    messages are rare (start, reload, stop, one watchdog ping per interval), and no file
    descriptor is held for the daemon's lifetime. A send never raises: systemd missing a
    status line must not stop the daemon, so failures are logged as
    `systemd.notify_failed`.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """`address` as in `NOTIFY_SOCKET` (`/path` or `@abstract`); `watchdog_usec` as in
        `WATCHDOG_USEC`, already known to be meant for this process (None: no watchdog)."""
        self.address = address
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Build from `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (default: os.environ)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            # systemd >= 254 may pass `vsock:CID:PORT` (inside VMs); only AF_UNIX is spoken here.
            log.warning("systemd.notify_unsupported", socket=address)
            address = None
        return cls(address, _watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        """True when systemd is listening (`NOTIFY_SOCKET` was set)."""
        return self.address is not None

    def ready(self, status: str = "serving") -> None:
        """Startup is complete: the listener is bound and recovery is done."""
        self._send("READY=1", _status(status))

    def reloading(self, status: str = "reloading configuration") -> None:
        """A reload (SIGHUP) has started.

        `MONOTONIC_USEC` is the CLOCK_MONOTONIC time of the request, which systemd >= 253
        requires with `Type=notify-reload` to tie this message to its own SIGHUP; older
        versions ignore the extra line.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={now_usec}", _status(status))

    def reloaded(self, status: str = "serving") -> None:
        """The reload is finished (applied or rejected): the service is ready again."""
        self._send("READY=1", _status(status))

    def stopping(self, status: str = "draining") -> None:
        """Shutdown has begun: no new work is taken, queued batches are being delivered."""
        self._send("STOPPING=1", _status(status))

    def status(self, text: str) -> None:
        """Set the one-line status shown by `systemctl status`."""
        self._send(_status(text))

    def watchdog(self) -> None:
        """Tell systemd the service is alive (resets the `WatchdogSec=` timer)."""
        self._send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3)
        advises), or None when no watchdog is asked of this process."""
        if not self.enabled or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2_000_000

    async def run_watchdog(self) -> None:
        """Ping the watchdog every interval until cancelled; return at once without one.

        The pings come from the event loop itself, so a loop blocked for longer than
        `WatchdogSec=` stops them and systemd restarts the service.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def _send(self, *lines: str) -> None:
        if self.address is None:
            return
        # A leading "@" names a Linux abstract socket, whose address starts with NUL.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        message = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message, target)
        except OSError as exc:
            log.warning(
                "systemd.notify_failed",
                socket=self.address,
                message=lines[0],
                error=f"{exc.__class__.__name__}: {exc}",
            )


def _status(text: str) -> str:
    # One message is newline-separated KEY=VALUE lines: a newline in the text would end it.
    return "STATUS=" + " ".join(text.splitlines())


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """`WATCHDOG_USEC` when it is a positive integer meant for this process, else None."""
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        # Set for another process (we were started by it, or it is a stale variable).
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None
