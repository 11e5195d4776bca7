"""A real webhook receiver (aiohttp server on 127.0.0.1) for the webhook channel's tests.

It records every request, verifies Standard Webhooks signatures with its own code written
from the spec (not firehosed's signer), and answers as scripted: a status with headers,
or a hang (the one thing a real receiver cannot be made to do on cue).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trustme
from aiohttp import web


@asynccontextmanager
async def serve(app: web.Application, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """Run `app` on a free 127.0.0.1 port; yield its base URL (http:// or https://)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"{'https' if tls else 'http'}://{host}:{port}"
    finally:
        await runner.cleanup()


def spec_key(secret: str) -> bytes:
    """The HMAC key of a secret: `whsec_` stripped and base64-decoded, else its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_") :])
    return secret.encode()


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> bool:
    """Standard Webhooks verification: any `v1,` signature matching, timestamp within 5 min."""
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        return False
    current = time.time() if now is None else now
    if not timestamp.isdigit() or abs(current - int(timestamp)) > 300:
        return False
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = hmac.new(spec_key(secret), signed, hashlib.sha256).digest()
    for entry in signatures.split(" "):
        version, _, signature = entry.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(signature), expected):
            return True
    return False


@dataclass
class Reply:
    """One scripted answer; `hang` never answers until the receiver is released."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


@dataclass
class Delivery:
    """One request as received, with the verification result per known secret."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    verified: list[bool]
    client_port: int


class WebhookReceiver:
    """Records requests to any path; answers scripted replies in order, then 200."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = secrets
        self.deliveries: list[Delivery] = []
        self.replies: list[Reply] = []
        self.released = asyncio.Event()
        self.url = ""
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    def script(self, *replies: Reply) -> None:
        """Queue answers for the next requests."""
        self.replies.extend(replies)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.deliveries.append(
            Delivery(
                method=request.method,
                path=request.path_qs,
                headers=headers,
                body=body,
                verified=[verify(s, headers, body) for s in self.secrets],
                client_port=peer[1] if peer else 0,
            )
        )
        reply = self.replies.pop(0) if self.replies else Reply()
        if reply.hang:
            await self.released.wait()
        return web.Response(status=reply.status, headers=reply.headers, text="receiver says no")


@pytest.fixture
async def webhook_receiver() -> AsyncIterator[WebhookReceiver]:
    """A plain-HTTP receiver knowing two secrets: a whsec_ one and a raw one."""
    receiver = WebhookReceiver(["whsec_" + base64.b64encode(b"k" * 24).decode(), "old-raw-secret"])
    async with serve(receiver.app) as url:
        receiver.url = url
        yield receiver
        receiver.released.set()


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throwaway CA; its certificate for 127.0.0.1 serves the https receiver."""
    return trustme.CA()


@pytest.fixture
async def webhook_tls_receiver(tls_ca: trustme.CA) -> AsyncIterator[WebhookReceiver]:
    """An https receiver whose certificate is signed by `tls_ca` (trusted by no system)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(context)
    receiver = WebhookReceiver([])
    async with serve(receiver.app, context) as url:
        receiver.url = url
        yield receiver
        receiver.released.set()
