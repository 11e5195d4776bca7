"""The alert mail's SMTP transport against real aiosmtpd servers: the SMTP password is
never sent over a connection without TLS unless `alerts.allow_plaintext_login` says so,
and a server that offers STARTTLS gets it even with `starttls = false`."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import msgspec
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from structlog.testing import capture_logs

from firehosed.alerts import Alerts, Incident
from firehosed.config import AlertsConfig
from firehosed.units import dec_hook
from tests.servers.smtp import PASSWORD, USERNAME, SmtpServer, running_smtp, tls_smtp_server

__all__ = ["tls_smtp_server"]  # a fixture, imported for pytest

TO = "ops@acme.example"
Logs = list[MutableMapping[str, Any]]


def config(smtp: str, **keys: Any) -> AlertsConfig:
    return msgspec.convert(
        {"smtp": smtp, "from": "firehosed@example.net", "timeout": "5s", **keys},
        AlertsConfig,
        dec_hook=dec_hook,
    )


def incident(firehose: str) -> Incident:
    return Incident(
        firehose=firehose,
        channel="partner_sftp",
        error="Connection refused",
        backlog_records=1,
        backlog_bytes=100,
        oldest_age=60.0,
        first_failure=1_763_895_480.0,
    )


class Logins:
    """An aiosmtpd authenticator that accepts USERNAME/PASSWORD and records every AUTH
    it is sent, with whether the session had TLS: what went over the wire."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bool]] = []

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            self.seen.append((data.password, session.ssl is not None))
        ok = data == (USERNAME.encode(), PASSWORD.encode())
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


@pytest.fixture
def plain_server() -> Iterator[tuple[SmtpServer, Logins]]:
    """A server without TLS that takes AUTH in clear (as a careless relay does)."""
    logins = Logins()
    with running_smtp(authenticator=logins, auth_require_tls=False) as server:
        yield server, logins


@pytest.fixture
def logs() -> Iterator[Logs]:
    with capture_logs() as captured:
        yield captured


async def test_no_login_in_clear_by_default(
    plain_server: tuple[SmtpServer, Logins], logs: Logs
) -> None:
    server, logins = plain_server
    alerts = Alerts(config(server.address, username=USERNAME, password=PASSWORD))
    alerts.failing(TO, incident("clear_fh"))
    await alerts.close()
    assert logins.seen == [], "the password was sent without TLS"
    assert server.inbox.received == []
    [failure] = [e for e in logs if e["event"] == "alert.failed"]
    assert "allow_plaintext_login" in failure["reason"], failure
    assert PASSWORD not in repr(logs)


async def test_a_login_upgrades_to_starttls_when_offered_even_with_starttls_false(
    tls_smtp_server: SmtpServer,
) -> None:
    alerts = Alerts(
        config(tls_smtp_server.address, starttls=False, username=USERNAME, password=PASSWORD)
    )
    alerts.failing(TO, incident("upgrade_fh"))
    [mail] = await tls_smtp_server.inbox.wait_for(1)
    await alerts.close()
    assert mail.tls and mail.login == USERNAME


async def test_a_login_in_clear_only_when_the_config_allows_it(
    plain_server: tuple[SmtpServer, Logins],
) -> None:
    server, logins = plain_server
    alerts = Alerts(
        config(server.address, username=USERNAME, password=PASSWORD, allow_plaintext_login=True)
    )
    alerts.failing(TO, incident("allowed_fh"))
    [mail] = await server.inbox.wait_for(1)
    await alerts.close()
    assert logins.seen == [(PASSWORD.encode(), False)]
    assert mail.login == USERNAME and not mail.tls


async def test_without_a_login_a_plain_relay_still_gets_mail(
    plain_server: tuple[SmtpServer, Logins],
) -> None:
    server, logins = plain_server
    alerts = Alerts(config(server.address))
    alerts.failing(TO, incident("relay_fh"))
    [mail] = await server.inbox.wait_for(1)
    await alerts.close()
    assert logins.seen == [] and mail.login is None
