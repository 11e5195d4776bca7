"""Authentication and secrets: one 401 for every bad credential, tokens compared in
constant time, and no token, password, key or signing secret ever shown: not in the log
(even at debug level), /metrics, /v1/status, `firehosed check [--connect]` output, nor in
any error message, including when every destination fails and an alert cannot be sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import RawTestServer, TestClient
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from firehosed.catchup import CatchUp
from firehosed.config import AccountConfig, CatchUpConfig, ServerConfig
from firehosed.ingest import auth
from firehosed.ingest.app import Api
from firehosed.ingest.receiver import Receiver
from firehosed.router import Router
from tests.daemon import TOKEN, Daemon, free_port, signal_record, wait_until
from tests.faults.report import report
from tests.servers.sftp import USERNAME, asyncssh_sftp_server
from tests.servers.smtp import running_smtp
from tests.servers.webhook import serve

SIGNALS = "/v1/accounts/{account}/signals"
UNAUTHORIZED = {"error": "missing or invalid bearer token for this account"}


# -- a daemon at debug level -------------------------------------------------------------


class DebugDaemon(Daemon):
    """The harness's daemon run with `--log-level debug`: secrets must not show even there."""

    def start(self, *, wait: bool = True, env: dict[str, str] | None = None) -> DebugDaemon:
        command = [sys.executable, "-m", "firehosed", "run", "--log-level", "debug"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*command, "-c", str(self.config_path)],
                cwd=self.root,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        if wait:
            wait_until(self.ready, timeout=20)
        return self

    def reload(self) -> None:
        """SIGHUP; wait until the reload was applied or rejected."""
        done = len(self.events("config.reloaded")) + len(self.events("config.reload_rejected"))
        self.signal(signal.SIGHUP)
        wait_until(
            lambda: (
                len(self.events("config.reloaded")) + len(self.events("config.reload_rejected"))
                > done
            )
        )


@pytest.fixture
def debug_daemon(tmp_path: Path) -> Iterator[Callable[..., DebugDaemon]]:
    made: list[DebugDaemon] = []

    def make(extra_config: str = "") -> DebugDaemon:
        root = tmp_path / f"debug{len(made)}"
        root.mkdir()
        made.append(DebugDaemon(root, extra_config))
        return made[-1]

    yield make
    for daemon in made:
        daemon.close()


def post(daemon: Daemon, account: str, headers: dict[str, str]) -> requests.Response:
    return daemon.session.post(
        daemon.url + SIGNALS.format(account=account),
        data=json.dumps([signal_record(1)]),
        headers={"Content-Type": "application/json", **headers},
        timeout=10,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def exposed(daemon: Daemon, secrets: list[str], *extra: tuple[str, str]) -> list[str]:
    """Which secrets show anywhere an operator looks: log, /metrics, /v1/status, `extra`."""
    places = [
        ("log", daemon.log_text()),
        ("/metrics", daemon.admin("/metrics").text),
        ("/v1/status", daemon.admin("/v1/status").text),
        ("/readyz", daemon.get("/readyz").text),
        *extra,
    ]
    return [
        f"{secret!r} in {name}" for secret in secrets for name, text in places if secret in text
    ]


# -- 401 -------------------------------------------------------------------------------

OTHER = '\n[accounts.other]\ntokens = ["other-token-9f8e7d"]\n'


def test_every_kind_of_bad_credential_gets_one_identical_401(make_daemon) -> None:
    daemon = make_daemon(OTHER).start()
    attempts = {
        "no header": ("acme", {}),
        "empty header": ("acme", {"Authorization": ""}),
        "scheme only": ("acme", {"Authorization": "Bearer"}),
        "scheme and spaces": ("acme", {"Authorization": "Bearer    "}),
        "Basic scheme": ("acme", {"Authorization": "Basic " + base64.b64encode(b"a:b").decode()}),
        "token without scheme": ("acme", {"Authorization": TOKEN}),
        "wrong token": ("acme", bearer("wrong-token")),
        "a prefix of the token": ("acme", bearer(TOKEN[:-1])),
        "the token plus a character": ("acme", bearer(TOKEN + "x")),
        "the token in upper case": ("acme", bearer(TOKEN.upper())),
        "the token twice": ("acme", bearer(f"{TOKEN} {TOKEN}")),
        "non-ASCII token": (
            "acme",
            {"Authorization": "Bearer t\u00f6ken".encode().decode("latin-1")},
        ),
        "another account's token": ("acme", bearer("other-token-9f8e7d")),
        "unknown account": ("nobody", bearer(TOKEN)),
        "unknown account, no token": ("nobody", {}),
        "account name differing in case": ("ACME", bearer(TOKEN)),
        "account name with a traversal": ("..%2Facme", bearer(TOKEN)),
        "a 2000-character account": ("a" * 2000, bearer(TOKEN)),
    }
    answers = {
        name: post(daemon, account, headers) for name, (account, headers) in attempts.items()
    }
    wrong = {n: (r.status_code, r.text) for n, r in answers.items() if r.status_code != 401}
    assert not wrong, wrong
    bodies = {name: r.json() for name, r in answers.items()}
    assert all(body == UNAUTHORIZED for body in bodies.values()), bodies
    assert daemon.status()["firehoses"]["fallback.acme"]["queued_records"] == 0
    # the right token still works after all that
    assert post(daemon, "acme", bearer(TOKEN)).status_code == 202


def test_a_401_carries_a_bearer_challenge(make_daemon) -> None:
    """RFC 9110 §11.6.1 / RFC 6750 §3: a 401 names the scheme to use."""
    daemon = make_daemon().start()
    response = post(daemon, "acme", bearer("wrong-token"))
    assert response.status_code == 401
    assert response.headers.get("WWW-Authenticate", "").lower().startswith("bearer")


@pytest.mark.parametrize(
    "header",
    [f"bearer {TOKEN}", f"BEARER {TOKEN}", f"BeArEr {TOKEN}", f"Bearer   {TOKEN}  "],
    ids=["lower", "upper", "mixed", "extra spaces"],
)
def test_the_bearer_scheme_is_case_insensitive(make_daemon, header: str) -> None:
    """RFC 9110 §11.1: auth schemes are case-insensitive."""
    daemon = make_daemon().start()
    response = post(daemon, "acme", {"Authorization": header})
    assert response.status_code == 202, response.text


# -- constant time, structurally -------------------------------------------------------


def refusing_receiver(tokens: dict[str, list[str]]) -> Receiver:
    """A real receiver for these accounts that refuses every request once authorised."""
    receiver = Receiver(
        Router(CatchUp(CatchUpConfig())),
        ServerConfig(),
        lambda account: "not accepting signals: a test stand-in",
    )
    receiver.configure(ServerConfig(), {n: AccountConfig(tokens=t) for n, t in tokens.items()})
    return receiver


async def test_every_configured_token_is_compared_whatever_the_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handler calls hmac.compare_digest once per token of the account (no early exit,
    even on a match), once for an unknown account, always with the whole token given."""
    tokens = [b"first-token-aaaa", b"second-token-bbbbbbbb", b"third"]
    receiver = refusing_receiver({"acme": [t.decode() for t in tokens], "other": ["o"]})
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    api = Api(receiver)
    cases = {
        "first token": ("acme", "first-token-aaaa", 503, 3),
        "last token": ("acme", "third", 503, 3),
        "wrong token": ("acme", "wrong", 401, 3),
        "a prefix of a token": ("acme", "first-token", 401, 3),
        "no token": ("acme", None, 401, 3),
        "other account's token": ("acme", "o", 401, 3),
        "unknown account": ("nobody", "first-token-aaaa", 401, 1),
        "unknown account, no token": ("nobody", None, 401, 1),
    }
    async with TestClient(RawTestServer(api.handle)) as client:
        for name, (account, token, status, compares) in cases.items():
            calls.clear()
            headers = bearer(token) if token is not None else {}
            response = await client.post(
                SIGNALS.format(account=account), headers=headers, data=b"[]"
            )
            assert response.status == status, name
            assert len(calls) == compares, (name, calls)
            given = token.encode() if token is not None else b""
            assert all(b == given and isinstance(a, bytes) for a, b in calls), (name, calls)
            if account == "acme":
                assert [a for a, _ in calls] == tokens, name


# -- no token shown anywhere ------------------------------------------------------------

ENV_TOKENS = ["tok-env-A1b2C3d4e5", "tok-env-F6g7H8i9j0"]
FILE_TOKENS = ["tok-file-K1l2M3n4o5", "tok-file-P6q7R8s9t0"]
ROTATED = "tok-file-rotated-U1v2W3x4"
INLINE_BAD = ["tok-inline-as-string-Z9y8", "tok-inline-typo-X7w6v5"]


def token_accounts(tokens_file: Path) -> str:
    return (
        OTHER
        + '\n[accounts.env_acct]\ntokens_env = "FH_TEST_TOKENS"\n'
        + f'\n[accounts.file_acct]\ntokens_file = "{tokens_file}"\n'
    )


def test_no_token_is_ever_logged_or_shown(debug_daemon) -> None:
    daemon = debug_daemon()
    tokens_file = daemon.root / "tokens"
    tokens_file.write_text("\n".join(FILE_TOKENS) + "\n")
    daemon.write_config(token_accounts(tokens_file))
    daemon.start(env={"FH_TEST_TOKENS": ", ".join(ENV_TOKENS)})
    everything = [TOKEN, "other-token-9f8e7d", *ENV_TOKENS, *FILE_TOKENS, ROTATED, *INLINE_BAD]
    for account, token in [
        ("acme", TOKEN),
        ("env_acct", ENV_TOKENS[1]),
        ("file_acct", FILE_TOKENS[0]),
    ]:
        assert post(daemon, account, bearer(token)).status_code == 202
        assert post(daemon, account, bearer(token + "x")).status_code == 401
        assert post(daemon, account, bearer(token[:-1])).status_code == 401
        assert post(daemon, "other", bearer(token)).status_code == 401
        # a header too long for aiohttp's parser: refused before the app, never logged
        assert post(daemon, account, bearer(token + "p" * 9000)).status_code == 400
    # rotate the file's tokens: the new one works, the old one no longer does
    tokens_file.write_text(ROTATED + "\n")
    daemon.reload()
    assert post(daemon, "file_acct", bearer(ROTATED)).status_code == 202
    assert post(daemon, "file_acct", bearer(FILE_TOKENS[0])).status_code == 401
    # an invalid reload that holds tokens in wrong places is refused without quoting them
    valid = daemon.config_path.read_text()
    daemon.config_path.write_text(
        valid
        + f'\n[accounts.bad]\ntokens = "{INLINE_BAD[0]}"\n'
        + f'\n[accounts.typo]\ntokenz = ["{INLINE_BAD[1]}"]\n'
    )
    daemon.reload()
    assert daemon.events("config.invalid")
    assert post(daemon, "file_acct", bearer(ROTATED)).status_code == 202
    leaks = exposed(daemon, everything)
    report("tokens", log_lines=len(daemon.log_text().splitlines()), leaks=len(leaks))
    assert not leaks, leaks


# -- secrets of channels and alerts -------------------------------------------------------


class ServerThread:
    """An event loop in a thread, for servers the (synchronous) test talks to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="servers")
        self.stack = contextlib.AsyncExitStack()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        return self

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def enter(self, manager: contextlib.AbstractAsyncContextManager[Any]) -> Any:
        return self.run(self.stack.enter_async_context(manager))

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.run(self.stack.aclose())
            self.run(_cancel_others())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


async def _cancel_others() -> None:
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def failing_receiver(echo: bool) -> web.Application:
    """A webhook receiver answering 500; with `echo`, its body echoes the request headers
    (as debugging endpoints and some proxies' error pages do)."""

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        text = "receiver failed"
        if echo:
            text += ": " + "; ".join(f"{k}: {v}" for k, v in request.headers.items())
        return web.Response(status=500, text=text)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@contextlib.asynccontextmanager
async def receiver(echo: bool = False) -> AsyncIterator[int]:
    async with serve(failing_receiver(echo)) as url:
        yield int(url.rsplit(":", 1)[1])


def refuse_login(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    return AuthResult(success=False, handled=False)


SFTP_PASSWORD = "sftp-pw-Q7x9Lm2Kp4"
SFTP_DOWN_PASSWORD = "sftp-down-pw-V3n8Bc6Zt1"
PASSPHRASE = "key-passphrase-H5j2Dd9Rw0"
HOOK_KEY = b"hook-signing-key-material-24b"
HOOK_SECRET = "whsec_" + base64.b64encode(HOOK_KEY).decode()
HEADER_SECRET = "hdr-secret-N4m7Qa1Ls8"
URL_PASSWORD = "url-pw-G2f5Tr8Yh3"
QUERY_SECRET = "query-secret-E6d9Ws2Xc5"
SMTP_PASSWORD = "smtp-pw-J8k1Ui4Op7"


def toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def channel(name: str, **keys: Any) -> str:
    lines = "".join(f"{k} = {toml(v)}\n" for k, v in keys.items())
    firehose = (
        f'\n[firehoses.to_{name}]\naccount = "acme"\nchannel = "{name}"\nformat = "ndjson"\n'
        'minutes_between_files = 0.005\nerror_alert_email = "ops@example.com"\n'
        'alert_after = "0s"\n'
    )
    return f"\n[channels.{name}]\n{lines}" + firehose


def secrets_config(root: Path, sftp: Any, hook_port: int, smtp: str, echo_port: int) -> str:
    (root / "known_hosts").write_text(sftp.known_hosts)
    (root / "passphrase").write_text(PASSPHRASE + "\n")
    (root / "sftp_password").write_text(SFTP_DOWN_PASSWORD + "\n")
    (root / "smtp_password").write_text(SMTP_PASSWORD + "\n")
    # The SMTP server has no TLS: the login must be allowed in clear to reach its 535.
    alerts = (
        f'\n[alerts]\nsmtp = "{smtp}"\nusername = "alerts"\nallow_plaintext_login = true\n'
        f'password_file = "{root / "smtp_password"}"\ntimeout = "5s"\n'
    )
    common = {"type": "sftp", "host": "127.0.0.1", "username": USERNAME, "connect_timeout": "3s"}
    return (
        alerts
        + channel(
            "sftp_pw",
            **common,
            port=sftp.port,
            password_env="FH_SFTP_PASSWORD",
            known_hosts_file=str(root / "known_hosts"),
        )
        + channel(
            "sftp_key",
            **common,
            port=sftp.port,
            private_key_env="FH_SFTP_KEY",
            passphrase_file=str(root / "passphrase"),
            host_key=sftp.fingerprint,
        )
        + channel(
            "sftp_down",
            **common,
            port=free_port(),
            password_file=str(root / "sftp_password"),
            host_key=sftp.fingerprint,
        )
        + channel(
            "hook",
            type="webhook",
            url=f"http://127.0.0.1:{hook_port}/in",
            secret_env="FH_HOOK_SECRET",
            headers={"Authorization": f"Bearer {HEADER_SECRET}", "X-Api-Key": HEADER_SECRET},
            timeout="3s",
        )
        + channel(
            "hook_url",
            type="webhook",
            url=f"http://hook-user:{URL_PASSWORD}@127.0.0.1:{hook_port}/in?api_key={QUERY_SECRET}",
            timeout="3s",
        )
        + (
            channel(
                "hook_echo",
                type="webhook",
                url=f"http://127.0.0.1:{echo_port}/in",
                headers={"Authorization": f"Bearer {HEADER_SECRET}"},
                timeout="3s",
            )
            if echo_port
            else ""
        )
    )


def encrypted_key() -> str:
    key = asyncssh.generate_private_key("ssh-ed25519")
    return key.export_private_key("pkcs8-pem", passphrase=PASSPHRASE).decode()


def secret_strings(private_key: str) -> list[str]:
    pem_lines = [ln for ln in private_key.splitlines() if len(ln) >= 16 and "-----" not in ln]
    return [
        SFTP_PASSWORD,
        SFTP_DOWN_PASSWORD,
        PASSPHRASE,
        HOOK_SECRET,
        HOOK_SECRET.removeprefix("whsec_"),
        HEADER_SECRET,
        URL_PASSWORD,
        QUERY_SECRET,
        SMTP_PASSWORD,
        TOKEN,
        *pem_lines,
    ]


def run_check(daemon: Daemon, env: dict[str, str], *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "firehosed", "check", *args, "-c", str(daemon.config_path)],
        cwd=daemon.root,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


@contextlib.contextmanager
def failing_destinations(
    tmp_path: Path, *, echo: bool = False
) -> Iterator[tuple[Any, int, int, str]]:
    """An SFTP server (refusing our credentials), a webhook receiver answering 500 (and,
    with `echo`, one echoing headers in its 500), an SMTP server refusing every login."""
    (tmp_path / "sftp").mkdir()
    with (
        ServerThread() as servers,
        running_smtp(authenticator=refuse_login, auth_require_tls=False) as smtp,
    ):
        sftp = servers.enter(asyncssh_sftp_server(tmp_path / "sftp"))
        hook_port = servers.enter(receiver())
        echo_port = servers.enter(receiver(echo=True)) if echo else 0
        yield sftp, hook_port, echo_port, smtp.address


FAILING = ["to_sftp_pw", "to_sftp_key", "to_sftp_down", "to_hook", "to_hook_url"]


def all_failed(daemon: Daemon) -> dict[str, Any] | None:
    """/v1/status's firehoses once every FAILING one shows its last error."""
    firehoses: dict[str, Any] = daemon.status()["firehoses"]
    return firehoses if all(firehoses[name]["last_error"] for name in FAILING) else None


def test_no_secret_shows_when_every_destination_and_the_alert_mail_fail(
    debug_daemon, tmp_path: Path
) -> None:
    private_key = encrypted_key()
    env = {
        "FH_SFTP_PASSWORD": SFTP_PASSWORD,
        "FH_SFTP_KEY": private_key,
        "FH_HOOK_SECRET": HOOK_SECRET,
    }
    with failing_destinations(tmp_path) as (sftp, hook_port, _, smtp):
        daemon = debug_daemon()
        try:
            daemon.write_config(secrets_config(daemon.root, sftp, hook_port, smtp, 0))
            daemon.start(env=env)
            assert daemon.post([signal_record(1)]).status_code == 202
            firehoses = wait_until(lambda: all_failed(daemon), timeout=20)
            wait_until(lambda: daemon.events("alert.failed"), timeout=20)
            checked = run_check(daemon, env)
            connected = run_check(daemon, env, "--connect")
        finally:
            daemon.close()
    errors = {name: firehoses[name]["last_error"]["error"] for name in FAILING}
    report("secrets", **{name: repr(error[:60]) for name, error in errors.items()})
    assert "authentication failed" in errors["to_sftp_pw"], errors
    assert "authentication failed" in errors["to_sftp_key"], errors
    assert "HTTP 500" in errors["to_hook"], errors
    assert "HTTP 500" in errors["to_hook_url"], errors
    assert checked[0] == 0, checked[1]
    assert connected[0] == 1 and connected[1].count("FAILED") == len(FAILING), connected[1]
    failures = [e for e in daemon.events("alert.failed") if e.get("kind") == "failing"]
    assert failures and "535" in str(failures[0]), daemon.events("alert.failed")
    leaks = [
        f"{secret!r} in {place}"
        for secret in secret_strings(private_key)
        for place, text in [
            ("log", daemon.log_text()),
            ("/v1/status", json.dumps(firehoses)),
            ("check", checked[1]),
            ("check --connect", connected[1]),
        ]
        if secret in text
    ]
    assert not leaks, leaks


def test_no_secret_shows_when_a_receiver_echoes_the_request_in_its_error(
    debug_daemon, tmp_path: Path
) -> None:
    """A receiver's error page may quote the request's headers; the daemon quotes the
    page in `last_error` and the log: the configured header values must not come along."""
    with failing_destinations(tmp_path, echo=True) as (sftp, hook_port, echo_port, smtp):
        daemon = debug_daemon()
        try:
            env = {
                "FH_SFTP_PASSWORD": SFTP_PASSWORD,
                "FH_SFTP_KEY": encrypted_key(),
                "FH_HOOK_SECRET": HOOK_SECRET,
            }
            daemon.write_config(secrets_config(daemon.root, sftp, hook_port, smtp, echo_port))
            daemon.start(env=env)
            assert daemon.post([signal_record(1)]).status_code == 202
            error = wait_until(lambda: daemon.status()["firehoses"]["to_hook_echo"]["last_error"])
            connected = run_check(daemon, env, "--connect")
            leaks = exposed(daemon, [HEADER_SECRET], ("check --connect", connected[1]))
        finally:
            daemon.close()
    assert "HTTP 500" in error["error"]
    assert not leaks, leaks


# -- config errors name the source of a secret, never its value ----------------------------


def test_config_errors_about_secrets_name_the_variable_or_file_never_the_value(
    make_daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = make_daemon()
    missing_file = daemon.root / "no-such-secret"
    daemon.write_config(
        channel(
            "unset_env",
            type="sftp",
            host="127.0.0.1",
            username="u",
            password_env="FH_TEST_NEVER_SET_4242",
            host_key="SHA256:x",
        )
        + channel(
            "both",
            type="sftp",
            host="127.0.0.1",
            username="u",
            password="inline-pw-Bb3Nn6",
            password_env="FH_SFTP_PASSWORD",
            host_key="SHA256:x",
        )
        + channel(
            "not_a_key",
            type="sftp",
            host="127.0.0.1",
            username="u",
            private_key_env="FH_NOT_A_KEY",
            host_key="SHA256:x",
        )
        + channel("bad_whsec", type="webhook", url="http://127.0.0.1:9/", secret_env="FH_BAD_WHSEC")
        + channel(
            "no_file", type="webhook", url="http://127.0.0.1:9/", secret_file=str(missing_file)
        )
    )
    values = {
        "FH_SFTP_PASSWORD": SFTP_PASSWORD,
        "FH_NOT_A_KEY": "looks-like-a-password-Kk8Ll9",
        "FH_BAD_WHSEC": "whsec_!!not*base64-Mm1Pp2",
    }
    monkeypatch.delenv("FH_TEST_NEVER_SET_4242", raising=False)
    status, output = run_check(daemon, values)
    assert status == 2, output
    config = daemon.config_path.name
    assert f"{config}:" in output and "FH_TEST_NEVER_SET_4242" in output, output
    assert "channels.unset_env.password_env" in output, output
    assert "channels.both.password_env" in output, output
    assert "channels.not_a_key.private_key" in output, output
    assert "channels.bad_whsec.secret" in output, output
    assert str(missing_file) in output, output
    shown = [v for v in [*values.values(), "inline-pw-Bb3Nn6", "!!not*base64"] if v in output]
    assert not shown, output


def test_a_webhook_with_url_credentials_and_an_authorization_header_is_a_config_error(
    make_daemon,
) -> None:
    """aiohttp refuses to send both (ValueError on every attempt): the config must say so
    up front rather than retry a delivery that can never be made."""
    daemon = make_daemon(
        channel(
            "hook",
            type="webhook",
            url=f"https://hook-user:{URL_PASSWORD}@127.0.0.1:9/in",
            headers={"Authorization": f"Bearer {HEADER_SECRET}"},
        )
    )
    status, output = run_check(daemon, {})
    assert status == 2, output
    assert "channels.hook." in output, output
    assert URL_PASSWORD not in output and HEADER_SECRET not in output, output
