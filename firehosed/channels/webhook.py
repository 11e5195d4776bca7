"""`webhook`: POST each batch, one JSON array, to an HTTP(S) endpoint, signed per Standard Webhooks.

Each request carries `webhook-id` (the batch id: stable across retries and restarts, so a
receiver can drop a repeat), `webhook-timestamp` (unix seconds of this attempt) and, when
secrets are set, `webhook-signature`: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`,
one per secret, space-separated, so a receiver holding either secret accepts the request
while secrets rotate. A secret `whsec_<base64>` is keyed by its base64-decoded bytes, as the
spec and its libraries do; any other secret is keyed by its UTF-8 bytes as written.

2xx is delivered; 410 stops the firehose (DestinationGone); any other status, a timeout
or a network error is retried by the worker, no sooner than the answer's Retry-After.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import ssl
import time
import uuid
from typing import ClassVar

import msgspec
import structlog
import yarl

from firehosed.channels.base import Batch, Channel
from firehosed.channels.http import HttpClient, excerpt, redact_url, status_error, tls_context
from firehosed.errors import DeliveryError
from firehosed.units import Duration

log = structlog.get_logger(__name__)

SECRET_PREFIX = "whsec_"
# Headers firehosed sets itself; `headers` may not override them.
RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "host",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class WebhookConfig(
    msgspec.Struct, tag="webhook", tag_field="type", forbid_unknown_fields=True, kw_only=True
):
    """`type = "webhook"`: batches are POSTed to `url` as JSON arrays.

    `secret` holds one or more space-separated signing secrets (several during rotation).
    `headers` are sent with every request (e.g. Authorization) and never logged. `ca` is
    PEM text trusted instead of the system's CAs; TLS is always verified. A batch holds at
    most `max_records` records (`max_wait` is accepted, not used: see Channel); a request
    not answered within `timeout` fails.
    """

    url: str
    secret: str | None = None
    secret_env: str | None = None
    secret_file: str | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    max_records: int = 500
    max_wait: Duration = Duration(0.0)
    timeout: Duration = Duration(10.0)
    ca: str | None = None
    ca_file: str | None = None

    def problems(self) -> list[tuple[str, str]]:
        """Cross-key rules, reported at config load as (key, message)."""
        found = _url_problems(self.url)
        secrets = (self.secret or "").split()
        for number, secret in enumerate(secrets, start=1):
            try:
                decode_secret(secret)
            except ValueError as exc:
                found.append(("secret", f"secret {number} of {len(secrets)}: {exc}"))
        found += _header_problems(self.headers)
        has_auth = any(name.lower() == "authorization" for name in self.headers)
        if has_auth and yarl.URL(self.url).user is not None:
            found.append(
                ("headers", "Authorization and credentials in the url cannot both be sent")
            )
        if self.max_records < 1:
            found.append(("max_records", "must be at least 1"))
        if self.timeout <= 0:
            found.append(("timeout", "must be greater than 0"))
        if self.ca:
            try:
                tls_context(self.ca)
            except ssl.SSLError:
                found.append(("ca", "holds no valid PEM certificate"))
        return found

    def warnings(self) -> list[tuple[str, str]]:
        """Credentials that would cross the network in clear (an http:// url)."""
        try:
            url = yarl.URL(self.url)
        except (TypeError, ValueError):
            return []
        if url.scheme != "http":
            return []
        found = []
        if url.user is not None or url.password is not None:
            found.append(("url", "credentials in an http:// url are sent in clear: use https://"))
        for name in self.headers:
            if _credential_header(name):
                found.append(
                    ("headers", f"header {name} is sent in clear to an http:// url: use https://")
                )
        return found


# Header names that carry credentials, as far as a name tells.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_CREDENTIAL_WORDS = ("token", "secret", "key", "auth", "password", "signature")


def _credential_header(name: str) -> bool:
    lower = name.lower()
    return lower in _CREDENTIAL_HEADERS or any(word in lower for word in _CREDENTIAL_WORDS)


def _url_problems(url: str) -> list[tuple[str, str]]:
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError):
        return [("url", "not a valid URL")]
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return [("url", 'expected "https://host/path" (or http://)')]
    return []


def _header_problems(headers: dict[str, str]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            found.append(("headers", f"{name!r} is not a valid header name"))
        elif name.lower() in RESERVED_HEADERS:
            found.append(("headers", f"{name} is set by firehosed itself"))
        if any(c in value for c in "\r\n\0"):
            found.append(("headers", f"the value of {name} holds a line break or NUL"))
    return found


def redact(text: str, hidden: list[str]) -> str:
    """`text` with every occurrence of a `hidden` value replaced."""
    for value in sorted(hidden, key=len, reverse=True):
        text = text.replace(value, "[redacted]")
    return text


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a secret: `whsec_<base64>` decoded, any other text as UTF-8 bytes.

    Raises ValueError (whose message never holds the secret) when it is unusable.
    """
    if secret.startswith(SECRET_PREFIX):
        encoded = secret[len(SECRET_PREFIX) :]
        try:
            # Secrets are often written without base64 padding; restore it.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error:
            raise ValueError(f"the part after {SECRET_PREFIX} is not valid base64") from None
    else:
        key = secret.encode()
    if not key:
        raise ValueError("the secret is empty")
    return key


def sign(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,<base64 HMAC-SHA256>` per key, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(key, signed, hashlib.sha256)).decode("ascii")
        for key in keys
    )


class WebhookChannel(Channel):
    """POSTs each batch's bytes unchanged; one aiohttp session, reused."""

    stream: ClassVar[bool] = True
    format: ClassVar[str | None] = "json"

    def __init__(self, name: str, config: WebhookConfig) -> None:
        super().__init__(name)
        self.url = config.url
        self.where = redact_url(config.url)
        self.keys = [decode_secret(secret) for secret in (config.secret or "").split()]
        self.extra_headers = dict(config.headers)
        # Header values and secrets, never to be quoted back from a receiver's error page.
        self.hidden = [v for v in config.headers.values() if v] + (config.secret or "").split()
        self.hidden += [v.split(" ", 1)[1] for v in config.headers.values() if " " in v]
        self.max_records = config.max_records
        self.max_wait = config.max_wait
        self.http = HttpClient(timeout=config.timeout, ca=config.ca)

    async def put(self, batch: Batch) -> None:
        try:
            body = await batch.read()
        except OSError as exc:
            raise DeliveryError(
                f"cannot read batch file {batch.path}: {exc.strerror or exc}"
            ) from exc
        status = await self._post(batch.id, body, batch.content_encoding)
        log.debug(
            "webhook.delivered",
            channel=self.name,
            batch=batch.id,
            records=batch.records,
            bytes=len(body),
            status=status,
        )

    async def check(self) -> str:
        """POST a (signed) empty array `[]` with webhook-id `check-<random>`.

        This proves DNS, TLS, the extra headers and, where the receiver verifies them,
        the signatures, without delivering a record; a receiver sees an empty batch.
        """
        status = await self._post(f"check-{uuid.uuid4().hex}", b"[]", None)
        signed = "a signed" if self.keys else "an"
        return f"webhook {self.where} accepted {signed} empty batch (HTTP {status})"

    async def close(self) -> None:
        await self.http.close()

    async def _post(self, msg_id: str, body: bytes, encoding: str | None) -> int:
        headers = self._headers(msg_id, body, encoding)
        answer = await self.http.request("POST", self.url, data=body, headers=headers)
        if not answer.ok:
            raise status_error(answer, self.where, redact(excerpt(answer.body), self.hidden))
        return answer.status

    def _headers(self, msg_id: str, body: bytes, encoding: str | None) -> dict[str, str]:
        # Signed afresh per attempt: receivers reject timestamps more than minutes old.
        timestamp = int(time.time())
        headers = {
            **self.extra_headers,
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
        }
        if encoding:
            headers["Content-Encoding"] = encoding
        if self.keys:
            headers["webhook-signature"] = sign(self.keys, msg_id, timestamp, body)
        return headers
