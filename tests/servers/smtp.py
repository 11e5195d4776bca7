"""A real SMTP server (aiosmtpd's threaded Controller) on a free 127.0.0.1 port.

`Inbox` is the server's handler: it keeps every message it accepts, parsed, with what
the session knew (TLS, authenticated login). It can also hold each message for `delay`
seconds before answering, to show a mail in flight or a server too slow to wait for.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

USERNAME = "alerts"
PASSWORD = "s3cret-Pa55"


@dataclass(frozen=True)
class Received:
    """One accepted message, as the server saw it."""

    message: EmailMessage
    mail_from: str
    rcpt_tos: list[str]
    tls: bool
    login: str | None


@dataclass
class Inbox:
    """The aiosmtpd handler: stores what it accepts (from the server's own thread)."""

    delay: float = 0.0
    received: list[Received] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        content = envelope.content if isinstance(envelope.content, bytes) else b""
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        auth: Any = session.auth_data  # what _authenticate returned: LoginPassword
        login = auth.login.decode() if session.authenticated else None
        self.received.append(
            Received(
                message=message,
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                tls=session.ssl is not None,
                login=login,
            )
        )
        return "250 Message accepted for delivery"

    async def wait_for(self, count: int, within: float = 10.0) -> list[Received]:
        """Poll until at least `count` messages arrived; fail after `within` seconds."""
        deadline = time.monotonic() + within
        while len(self.received) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"expected {count} messages, got {len(self.received)}")
            await asyncio.sleep(0.01)
        return list(self.received)


@dataclass(frozen=True)
class SmtpServer:
    """A running server: `address` is the `alerts.smtp` value that reaches it."""

    address: str
    inbox: Inbox
    ca_file: Path | None = None


def free_port() -> int:
    """A TCP port nothing listens on right now (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running_smtp(inbox: Inbox | None = None, **options: Any) -> Iterator[SmtpServer]:
    """Run an aiosmtpd server for the block; `options` go to aiosmtpd's SMTP class."""
    inbox = inbox or Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield SmtpServer(address=f"127.0.0.1:{port}", inbox=inbox)
    finally:
        controller.stop()


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (
        USERNAME.encode(),
        PASSWORD.encode(),
    )
    # handled=False: aiosmtpd itself answers 235 or 535.
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


@contextmanager
def running_tls_smtp(directory: Path) -> Iterator[SmtpServer]:
    """A server that requires STARTTLS (trustme certificate) and AUTH as USERNAME/PASSWORD.

    The CA is written to `directory`; clients trust it through `SSL_CERT_FILE`.
    """
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = directory / "smtp-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    options: dict[str, Any] = {
        "tls_context": context,
        "require_starttls": True,
        "authenticator": _authenticate,
        "auth_required": True,
    }
    with running_smtp(**options) as server:
        yield SmtpServer(address=server.address, inbox=server.inbox, ca_file=ca_file)


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A plain SMTP server that accepts every message at once."""
    with running_smtp() as server:
        yield server


@pytest.fixture
def tls_smtp_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmtpServer]:
    """A STARTTLS + AUTH server whose CA this test's TLS clients trust."""
    with running_tls_smtp(tmp_path) as server:
        monkeypatch.setenv("SSL_CERT_FILE", str(server.ca_file))
        yield server
