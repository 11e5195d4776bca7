"""HTTP plumbing shared by the `webhook` and `pubsub` channels (aiohttp client).

One lazily opened ClientSession per channel with TLS always verified, `Retry-After`
parsing, and the one place where HTTP statuses and aiohttp errors become DeliveryError.
Error messages name the URL without its query string or user info, which may hold
secrets (`?token=...`).
"""

from __future__ import annotations

import contextlib
import email.utils
import io
import math
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC

import aiohttp
import yarl

from firehosed.errors import DeliveryError, DestinationGone

# Answers are read up to this size: enough for any Pub/Sub or token answer, and a
# webhook receiver's chatter cannot make us buffer megabytes.
MAX_ANSWER = 1 << 20
EXCERPT = 200


@dataclass(frozen=True, slots=True)
class Answer:
    """A server's answer: status, headers and (at most MAX_ANSWER bytes of) body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def ok(self) -> bool:
        """True for a 2xx status."""
        return 200 <= self.status < 300


def tls_context(ca: str | None) -> ssl.SSLContext:
    """A verifying TLS context: `ca` (PEM text) alone when given, else the system's CAs.

    Raises ssl.SSLError when `ca` holds no valid certificate.
    """
    if ca:
        return ssl.create_default_context(cadata=ca)
    return ssl.create_default_context()


def redact_url(url: str) -> str:
    """`url` without user info, query or fragment, fit for logs and error messages."""
    try:
        parsed = yarl.URL(url).with_query(None).with_fragment(None)
        if parsed.is_absolute():
            parsed = parsed.with_user(None)
    except (TypeError, ValueError):
        return "<invalid url>"
    return str(parsed)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value (delay-seconds or HTTP-date), or None."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    with contextlib.suppress(ValueError):  # not delay-seconds: try an HTTP-date
        seconds = float(text)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        # An HTTP-date is always GMT; "-0000" comes back naive.
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def excerpt(body: bytes) -> str:
    """The first characters of an answer body on one line, for an error message."""
    text = " ".join(body[: EXCERPT * 4].decode("utf-8", "replace").split())
    return text if len(text) <= EXCERPT else text[:EXCERPT] + "..."


def status_error(answer: Answer, where: str, detail: str = "") -> DeliveryError:
    """The DeliveryError for a non-2xx answer: 410 is DestinationGone, all else is retried.

    `retry_after` comes from the answer's Retry-After header.
    """
    message = f"HTTP {answer.status} from {where}"
    if 300 <= answer.status < 400:
        location = redact_url(answer.headers.get("Location", ""))
        detail = "redirects are not followed" + (
            f": point the url at {location}" if location else ""
        )
    if detail:
        message = f"{message}: {detail}"
    if answer.status == 410:
        return DestinationGone(message)
    return DeliveryError(message, retry_after=parse_retry_after(answer.headers.get("Retry-After")))


class HttpClient:
    """One aiohttp ClientSession (opened on first use, in the running loop) for a channel.

    Every request has `timeout` seconds in total, from connect to the last body byte.
    Redirects are not followed: a POST silently turned into a GET must not count as
    delivered.
    """

    def __init__(self, *, timeout: float, ca: str | None = None) -> None:
        self.timeout = timeout
        self._tls = tls_context(ca)
        self._session: aiohttp.ClientSession | None = None

    async def request(
        self,
        method: str,
        url: str,
        *,
        data: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """Send one request; return the answer whatever its status, or raise DeliveryError."""
        where = redact_url(url)
        try:
            # A file-like body is written in chunks: large bodies do not stall the loop.
            body = io.BytesIO(data) if data else None
            async with self._open().request(
                method, url, data=body, headers=headers, allow_redirects=False
            ) as response:
                return Answer(response.status, response.headers, await _read_limited(response))
        except TimeoutError as exc:
            raise DeliveryError(f"no answer from {where} within {self.timeout:g}s") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise DeliveryError(
                f"TLS certificate of {where} is not trusted ({exc.certificate_error}): "
                "set ca or ca_file to the CA that signed it"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            reason = str(exc).replace(url, where) or exc.__class__.__name__
            raise DeliveryError(f"{where}: {reason}") from exc

    async def close(self) -> None:
        """Close the session and its connections; a later request opens a new one."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._tls),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_ANSWER:
            break
    return b"".join(chunks)[:MAX_ANSWER]
