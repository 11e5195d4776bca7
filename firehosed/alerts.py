"""Error-alert e-mails: a firehose is failing, has recovered, or dead-lettered a batch.

The delivery worker reports events; this module decides which of them become mail and
sends it in the background, so an alert never delays delivery and an SMTP problem never
reaches the worker. Policy, per firehose:

- `failing`: at most one alert per `alerts.every`. The worker may report every failed
  attempt; the rest are dropped here. The period runs across incidents, so a firehose
  that flaps (fails, recovers, fails again) still sends at most one failure mail per
  period. The period counts attempts: an SMTP server that is down is tried at most once
  per period too.
- `recovered`: exactly one mail when delivery works again, and only if a failure mail of
  this incident was accepted by the SMTP server (no "recovered" for an unseen failure).
  It waits for that failure mail first, so the two arrive in order.
- `dead_lettered`: always mailed, one per batch, never rate-limited: it is rare, and each
  one names records that now need a person.

With no recipient (`to=None`) the events are still logged, nothing is mailed.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Literal

import aiosmtplib
import structlog

from firehosed import metrics
from firehosed.config import AlertsConfig, smtp_address
from firehosed.errors import FirehosedError

log = structlog.get_logger(__name__)

Kind = Literal["failing", "recovered", "dead_letter", "archive_late"]

_SUBJECT_ERROR_CHARS = 80


class PlaintextLoginRefused(FirehosedError):
    """The SMTP server offers no TLS, and the config does not allow a login without it."""


# Errors a send may meet: the server refused, went away, timed out, rejected the login,
# offered no TLS for the login, or the message could not be built (an invalid address).
_SEND_ERRORS = (
    aiosmtplib.SMTPException,
    OSError,
    TimeoutError,
    ValueError,
    PlaintextLoginRefused,
)


@dataclass(frozen=True, slots=True)
class Incident:
    """What the worker knows about a firehose's delivery problem, for one alert."""

    firehose: str
    channel: str
    error: str  # the last error message (never contains secrets)
    backlog_records: int
    backlog_bytes: int
    oldest_age: float  # seconds
    first_failure: float  # unix time of the first failed attempt of this incident


@dataclass(slots=True)
class _Episode:
    """The failure mails of one open incident of one firehose."""

    sent: bool = False  # a failure mail was accepted by the SMTP server
    last: asyncio.Task[None] | None = None  # the latest failure mail, awaited before the next


class Alerts:
    """Sends alert e-mails in tracked background tasks; see the module docstring for policy."""

    def __init__(self, config: AlertsConfig) -> None:
        self._config = config
        self._host = socket.gethostname()
        self._last_failing: dict[str, float] = {}  # firehose -> monotonic time of last alert
        self._open: dict[str, _Episode] = {}  # firehose -> incident with a failure alert
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def failing(self, to: str | None, incident: Incident) -> None:
        """Report that `incident.firehose` keeps failing; mails at most once per `every`."""
        now = time.monotonic()
        last = self._last_failing.get(incident.firehose)
        if last is not None and now - last < self._config.every:
            return
        self._last_failing[incident.firehose] = now
        episode = self._open.setdefault(incident.firehose, _Episode())
        log.warning("alert.failing", to=to, **_fields(incident))
        if to is not None:
            episode.last = self._spawn(
                "failing", incident, self._mail_failing(to, incident, episode, episode.last)
            )

    def recovered(self, to: str | None, incident: Incident) -> None:
        """Report that `incident.firehose` delivers again; mails once if a failure mail went."""
        episode = self._open.pop(incident.firehose, None)
        if episode is None:
            return
        log.info("alert.recovered", to=to, **_fields(incident))
        if to is not None and episode.last is not None:
            self._spawn("recovered", incident, self._mail_recovered(to, incident, episode))

    def dead_lettered(self, to: str | None, incident: Incident, batch_name: str) -> None:
        """Report that a batch was moved to the dead-letter store; always mailed."""
        log.error("alert.dead_letter", to=to, batch=batch_name, **_fields(incident))
        if to is not None:
            self._spawn("dead_letter", incident, self._mail_dead_letter(to, incident, batch_name))

    def archive_late(self, to: str | None, incident: Incident, archive: str) -> None:
        """Report that a daily archive missed its `deliver_by` time; mailed once per day
        (the caller asks once)."""
        log.error("alert.archive_late", to=to, archive=archive, **_fields(incident))
        if to is not None:
            self._spawn("archive_late", incident, self._mail_archive_late(to, incident, archive))

    def reconfigure(self, config: AlertsConfig) -> None:
        """Use a reloaded `[alerts]` for the next mails; rate limits and incidents are kept."""
        self._config = config

    # The worker's contract is `close(timeout=...)`: on expiry the mails are cancelled and
    # counted, which a caller's own `asyncio.timeout` around close() would not do.
    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Stop taking alerts, wait up to `timeout` for mails in flight, then cancel the rest."""
        self._closed = True
        tasks = set(self._tasks)
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            metrics.alerts_failed.inc(len(pending))
        log.info("alerts.closed", finished=len(done), abandoned=len(pending))

    async def _mail_failing(
        self, to: str, incident: Incident, episode: _Episode, after: asyncio.Task[None] | None
    ) -> None:
        await _settled(after)
        if await self._deliver(to, "failing", incident):
            episode.sent = True

    async def _mail_recovered(self, to: str, incident: Incident, episode: _Episode) -> None:
        await _settled(episode.last)
        if episode.sent:
            await self._deliver(to, "recovered", incident)

    async def _mail_archive_late(self, to: str, incident: Incident, archive: str) -> None:
        await self._deliver(to, "archive_late", incident, archive)

    async def _mail_dead_letter(self, to: str, incident: Incident, batch_name: str) -> None:
        await self._deliver(to, "dead_letter", incident, batch_name)

    async def _deliver(self, to: str, kind: Kind, incident: Incident, batch_name: str = "") -> bool:
        """Send one mail; log and count the outcome. True when the server accepted it."""
        config = self._config
        try:
            host, port = smtp_address(config.smtp)
            message = compose(config, self._host, to, kind, incident, batch_name=batch_name)
            async with asyncio.timeout(config.timeout):
                await self._send(config, host, port, message)
        except _SEND_ERRORS as exc:
            metrics.alerts_failed.inc()
            log.warning(
                "alert.failed",
                firehose=incident.firehose,
                kind=kind,
                smtp=config.smtp,
                error=type(exc).__name__,
                reason=str(exc)[:200],
            )
            return False
        metrics.alerts_sent.labels(incident.firehose, kind).inc()
        log.info("alert.sent", firehose=incident.firehose, kind=kind, smtp=config.smtp)
        return True

    async def _send(
        self, config: AlertsConfig, host: str, port: int, message: EmailMessage
    ) -> None:
        """Connect (STARTTLS, login as configured), send, quit.

        STARTTLS: required with `starttls`; with a login, used whenever the server offers
        it (aiosmtplib's `start_tls=None`), and a login without TLS is refused unless
        `allow_plaintext_login`; without either, none (a plain local relay).

        Not `aiosmtplib.send`: on cancellation its context manager still waits for QUIT's
        answer, which a stuck server never gives; here the socket is simply closed. A
        session that failed or was cancelled is aborted, not closed: closing a TLS
        connection waits for the server's close_notify, so the socket could outlive a
        stopping daemon's loop. That is also why the login is a step of its own:
        `connect()` would close (gracefully) on a refused login before we could abort.
        """
        login = config.username is not None
        client = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            start_tls=True if config.starttls else (None if login else False),
            timeout=config.timeout,
            local_hostname=self._host,
        )
        try:
            await client.connect()
            if config.username is not None:  # as aiosmtplib's login on connect does
                _check_login_transport(client, config)
                await client.login(config.username, config.password or "")
            await client.send_message(message)
            await client.quit()
        except BaseException:
            if isinstance(client.transport, asyncio.Transport):
                client.transport.abort()
            raise
        finally:
            client.close()

    def _spawn(
        self, kind: Kind, incident: Incident, mail: Coroutine[Any, Any, None]
    ) -> asyncio.Task[None] | None:
        if self._closed:
            mail.close()
            metrics.alerts_failed.inc()
            log.warning("alert.failed", firehose=incident.firehose, kind=kind, error="closed")
            return None
        task = asyncio.create_task(mail, name=f"alert:{kind}:{incident.firehose}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            metrics.alerts_failed.inc()
            log.error("alert.crashed", task=task.get_name(), error=type(exc).__name__, exc_info=exc)


def _check_login_transport(client: aiosmtplib.SMTP, config: AlertsConfig) -> None:
    """Raise PlaintextLoginRefused rather than send the password over plain text."""
    if client.get_transport_info("sslcontext") is None and not config.allow_plaintext_login:
        raise PlaintextLoginRefused(
            f"{config.smtp} offers no STARTTLS: the login was not sent in clear "
            "(alerts.allow_plaintext_login = true would send the password without TLS)"
        )


def compose(
    config: AlertsConfig,
    host: str,
    to: str,
    kind: Kind,
    incident: Incident,
    *,
    batch_name: str = "",
) -> EmailMessage:
    """The alert e-mail: a one-line subject and a plain-text body a person can act on."""
    message = EmailMessage()
    message["From"] = config.from_
    message["To"] = to
    message["Subject"] = _subject(kind, incident, batch_name)
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid("firehosed", domain=host)
    # RFC 3834: tells vacation responders and ticket systems not to answer.
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(_body(config, host, kind, incident, batch_name))
    return message


def _subject(kind: Kind, incident: Incident, batch_name: str) -> str:
    prefix = f"[firehosed] firehose {incident.firehose}"
    if kind == "failing":
        return f"{prefix} failing: {_short(incident.error)}"
    if kind == "recovered":
        return f"{prefix} recovered"
    if kind == "archive_late":
        return f"{prefix} late: archive {batch_name} not delivered by its deliver_by time"
    return f"{prefix} dead-lettered batch {batch_name}"


def _body(config: AlertsConfig, host: str, kind: Kind, incident: Incident, batch_name: str) -> str:
    first = _utc(incident.first_failure)
    if kind == "failing":
        lead = (
            f"Firehose {incident.firehose} has been failing to deliver to channel "
            f"{incident.channel} since {first}.\n\n"
            "Delivery is retried with backoff and nothing is dropped; a batch still failing "
            "after the firehose's retry_for goes to the dead-letter store.\n"
            f"You get at most one such mail every {human_age(config.every)} for this "
            "firehose, and one more when it recovers."
        )
    elif kind == "recovered":
        lead = (
            f"Firehose {incident.firehose} delivers to channel {incident.channel} again, "
            f"after failing for {human_age(time.time() - incident.first_failure)}.\n"
            "The backlog below is being delivered."
        )
    elif kind == "archive_late":
        lead = (
            f"The daily archive {batch_name} of firehose {incident.firehose} was not in "
            f"channel {incident.channel} by the firehose's deliver_by time.\n"
            f"Why: {incident.error}\n"
            "It is delivered as soon as it can be; firehosed_archive_late stays 1 until then."
        )
    else:
        lead = (
            f"Batch {batch_name} of firehose {incident.firehose} could not be delivered to "
            f"channel {incident.channel} and was moved to the dead-letter store.\n"
            "Its records are kept there; they need replaying once the channel works."
        )
    return f"{lead}\n\n{_facts(incident, host, recovered=kind == 'recovered')}\n"


def _facts(incident: Incident, host: str, *, recovered: bool) -> str:
    rows = [
        ("Firehose", incident.firehose),
        ("Channel", incident.channel),
        ("Last error" if recovered else "Error", incident.error),
        ("Backlog", f"{incident.backlog_records:,} records, {human_size(incident.backlog_bytes)}"),
        ("Oldest queued", human_age(incident.oldest_age)),
        ("First failure", _utc(incident.first_failure)),
        ("Host", host),
    ]
    indent = "\n" + " " * 16
    return "\n".join(f"{name + ':':<16}{indent.join(value.splitlines())}" for name, value in rows)


def human_age(seconds: float) -> str:
    """A duration as its two largest units: "45s", "12m 30s", "3h", "2d 4h"."""
    total = max(0, round(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, total = divmod(total, size)
        parts.append((count, unit))
    first = next((i for i, (count, _) in enumerate(parts) if count), len(parts) - 1)
    shown = [f"{count}{unit}" for count, unit in parts[first : first + 2] if count]
    return " ".join(shown) or "0s"


def human_size(size: int) -> str:
    """Bytes for a person: "512 B", "1.5 MiB"."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _fields(incident: Incident) -> dict[str, object]:
    return {
        "firehose": incident.firehose,
        "channel": incident.channel,
        "error": incident.error,
        "backlog_records": incident.backlog_records,
        "backlog_bytes": incident.backlog_bytes,
        "oldest_age": round(incident.oldest_age, 1),
    }


def _short(error: str) -> str:
    """The error's first line, whitespace collapsed, cut to fit a subject."""
    line = " ".join(error.strip().split("\n", 1)[0].split()) or "unknown error"
    if len(line) > _SUBJECT_ERROR_CHARS:
        line = line[: _SUBJECT_ERROR_CHARS - 1] + "…"
    return line


def _utc(unix_time: float) -> str:
    return (
        datetime.fromtimestamp(unix_time, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


async def _settled(task: asyncio.Task[None] | None) -> None:
    """Wait for an earlier mail to finish, whatever its outcome."""
    if task is not None:
        await asyncio.wait({task})
