"""`firehosed check`: exit 0 with a summary, or exit 2 with one `FILE:LINE: key: message`
per problem; `firehosed run` refuses the same files, and SIGHUP keeps the old config."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.daemon import BASE_CONFIG, signal_record, wait_until

REPO = Path(__file__).resolve().parent.parent
UNSET = "FIREHOSED_TEST_SURELY_UNSET"

VALID = """\
[server]
listen = "127.0.0.1:8080"
max_body = "1MiB"
drain_timeout = "5s"

[catch_up]
signals_per_session = 10

[accounts.acme]
tokens = ["t"]

[channels.local]
type = "directory"
path = "./export"

[mappings.cols]
type = "type"
email = "person.email"

[firehoses.f]
account = "acme"
channel = "local"
format = "json"
minutes_between_files = 1
"""

SHIPPED_STYLE = """\
# Every section of DESIGN.md §4, with the channel types this build registers.
[server]
listen = "127.0.0.1:8080"        # "host:port" or "unix:/run/firehosed/http.sock"
max_body = "10MiB"
drain_timeout = "30s"

[storage]
dir = "./var"
durability = "fsync"
max_disk = "10GiB"

[catch_up]
signals_per_session = 30
session_ttl = "24h"
max_memory = "512MiB"

[alerts]
smtp = "localhost:25"
from = "firehosed@localhost"
starttls = false
every = "15m"
username = "alerts"
password_file = "{password_file}"

[fallback]
channel = "local"

[accounts.acme]
tokens_env = "FIREHOSED_TEST_TOKENS"
firehose_enabled = true
dedupe_window = "10m"
dedupe_max = 1_000_000
[accounts.acme.fields]
type = "type"
id = "signal_id.$oid"
session = "did"
person = "pid"
time = "evdt.$date"

[accounts.beta]
tokens = ["beta-1", "beta-2"]

[channels.local]
type = "directory"
path = "./var/export"

[channels.archive]
type = "directory"
path = "/srv/archive"
fsync = false

[mappings.faststats]
tms_type = "type"
email = "person.email"
product = "cart.p.0.prid"

[firehoses.acme_files]
account = "acme"
channel = "archive"
format = "csv"
mapping = "faststats"
compression = "none"
minutes_between_files = 5
max_file = "64MiB"
filename_pattern = "firehose-%Y-%m-%d-%H-%M-%S-%f"
types = []
include_anonymous = true
catch_up = true
send_person_identified = false
paused = false
error_alert_email = "ops@acme.example"
alert_after = "5m"
retry_for = "24h"

[firehoses.acme_purchases]
account = "acme"
channel = "local"
format = "json"
mapping = "faststats"
compression = "gzip"
minutes_between_files = 0.5
types = ["t", "b"]
include_anonymous = false
"""


def check(path: Path, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m firehosed check -c path`."""
    return subprocess.run(
        [sys.executable, "-m", "firehosed", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=path.parent,
        env={k: v for k, v in {**os.environ, **(env or {})}.items() if k != UNSET},
        check=False,
    )


def line_of(text: str, needle: str) -> int:
    """The 1-based number of the first line of `text` containing `needle`."""
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in the config")


def expected_line(path: Path, text: str, needle: str, key: str, message: str) -> re.Pattern[str]:
    """The problem line `PATH:LINE: key: ...message...`, LINE being where `needle` is."""
    prefix = f"{path}:{line_of(text, needle)}: {key}: "
    return re.compile(re.escape(prefix) + r".*" + re.escape(message) + r".*")


def assert_problems(
    result: subprocess.CompletedProcess[str], path: Path, *wanted: re.Pattern[str]
) -> list[str]:
    """Exit 2, every stderr line a `PATH:LINE: ` problem, each wanted one among them."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "ok" not in result.stdout
    lines = result.stderr.splitlines()
    assert lines, "no problem printed"
    for line in lines:
        assert re.match(re.escape(str(path)) + r":\d+: \S", line), line
    for pattern in wanted:
        assert any(pattern.fullmatch(line) for line in lines), (pattern.pattern, lines)
    return lines


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- valid files -----------------------------------------------------------------------


def test_the_shipped_config_passes() -> None:
    result = check(REPO / "config.toml")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r".*config\.toml: ok \(\d+ accounts?, \d+ channels?, \d+ firehoses?\)\n", result.stdout
    ), result.stdout


def test_a_shipped_style_config_passes_with_a_summary(tmp_path: Path) -> None:
    secret = write(tmp_path, "smtp-password\n", "smtp_password")
    path = write(tmp_path, SHIPPED_STYLE.format(password_file=secret))
    result = check(path, env={"FIREHOSED_TEST_TOKENS": "tok-1,tok-2"})
    assert result.returncode == 0, result.stderr
    # acme's two firehoses plus beta's fallback
    assert result.stdout == f"{path}: ok (2 accounts, 2 channels, 3 firehoses)\n"
    assert result.stderr == ""


def test_the_minimal_base_config_passes(tmp_path: Path) -> None:
    result = check(write(tmp_path, VALID))
    assert result.returncode == 0, result.stderr


def test_check_says_how_each_import_pattern_is_read(tmp_path: Path) -> None:
    tasks = {
        "quoted": "'path/to/users'-YYYY-MM-dd'.avro'",  # Amperity's spelling
        "strftime": "heap/users-%Y-%m-%d.csv",
        "globbed": "heap/users-*.csv",
    }
    text = VALID
    for name, pattern in tasks.items():
        text += f'\n[imports.{name}]\naccount = "acme"\nsource = "local"\nformat = "avro"\n'
        text += f'pattern = "{pattern}"\nonce = true\noffset = "-1d"\n'
    result = check(write(tmp_path, text))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()[1:]
    assert len(lines) == 3
    globbed, quoted, strftime = (line.split(": ", 1) for line in lines)
    assert globbed[0] == "imports.globbed.pattern"
    assert re.fullmatch(
        r"read as a fixed path, with a glob: on \S+ it selects heap/users-\*\.csv", globbed[1]
    )
    assert quoted[0] == "imports.quoted.pattern"
    day = re.fullmatch(
        r"read as a quoted date pattern \(Amperity style: yyyy-MM-dd fields, 'literal text'\): "
        r"on (\d{4}-\d\d-\d\d) it selects path/to/users-(\d{4}-\d\d-\d\d)\.avro",
        quoted[1],
    )
    assert day is not None and day[1] == day[2]
    assert strftime == [
        "imports.strftime.pattern",
        f"read as strftime: on {day[1]} it selects heap/users-{day[1]}.csv",
    ]


# -- one problem each: the right line, key and message --------------------------------

# An import task after VALID's firehose: each case adds its own lines.
IMPORT = (
    "minutes_between_files = 1|minutes_between_files = 1\n\n"
    '[imports.i]\naccount = "acme"\nsource = "local"\n'
)

CASES: dict[str, tuple[str, str, str, str]] = {
    # name: (edit of VALID as "old|new", needle marking the line, key, message fragment)
    "unknown key": (
        'max_body = "1MiB"|max_body = "1MiB"\nmax_bodyy = "2MiB"',
        "max_bodyy",
        "server.max_bodyy",
        "unknown key",
    ),
    "unknown key in a firehose": (
        "minutes_between_files = 1|minutes_between_file = 1",
        "minutes_between_file",
        "firehoses.f.minutes_between_file",
        "unknown key",
    ),
    "unknown key in a channel": (
        'path = "./export"|path = "./export"\nfsynk = true',
        "fsynk",
        "channels.local.fsynk",
        "unknown key",
    ),
    "unknown section": (
        "[catch_up]|[catchup]",
        "[catchup]",
        "catchup",
        "unknown section",
    ),
    "wrong type": (
        'signals_per_session = 10|signals_per_session = "many"',
        "signals_per_session",
        "catch_up.signals_per_session",
        "Expected `int`, got `str`",
    ),
    "wrong type in a firehose": (
        'format = "json"|format = "json"\npaused = "yes"',
        "paused",
        "firehoses.f.paused",
        "Expected `bool`, got `str`",
    ),
    "tokens not a list": (
        'tokens = ["t"]|tokens = "t"',
        "tokens",
        "accounts.acme.tokens",
        "Expected `array`, got `str`",
    ),
    "bad size": (
        'max_body = "1MiB"|max_body = "10 parsecs"',
        "max_body",
        "server.max_body",
        "invalid size '10 parsecs'",
    ),
    "bad duration": (
        'drain_timeout = "5s"|drain_timeout = "soon"',
        "drain_timeout",
        "server.drain_timeout",
        "invalid duration 'soon'",
    ),
    "unknown format": (
        'format = "json"|format = "xml"',
        "format",
        "firehoses.f.format",
        "xml",
    ),
    "missing channel": (
        'channel = "local"|channel = "nowhere"',
        'channel = "nowhere"',
        "firehoses.f.channel",
        "no channel named 'nowhere'",
    ),
    "missing account": (
        'account = "acme"|account = "nobody"',
        'account = "nobody"',
        "firehoses.f.account",
        "no account named 'nobody'",
    ),
    "missing mapping": (
        'format = "json"|format = "json"\nmapping = "nomap"',
        'mapping = "nomap"',
        "firehoses.f.mapping",
        "no mapping named 'nomap'",
    ),
    "csv without mapping": (
        'format = "json"|format = "csv"',
        'format = "csv"',
        "firehoses.f.format",
        "csv needs a mapping",
    ),
    "missing required key": (
        'channel = "local"\nformat|format',
        "[firehoses.f]",
        "firehoses.f",
        "missing required key 'channel'",
    ),
    "unknown channel type": (
        'type = "directory"|type = "gopher"',
        'type = "gopher"',
        "channels.local.type",
        "got 'gopher'",
    ),
    "fallback naming a missing channel": (
        '[catch_up]|[fallback]\nchannel = "gone"\n\n[catch_up]',
        'channel = "gone"',
        "fallback.channel",
        "no channel named 'gone'",
    ),
    "bad listen": (
        'listen = "127.0.0.1:8080"|listen = "nowhere"',
        "listen",
        "server.listen",
        "nowhere",
    ),
    "tokens_env unset": (
        f'tokens = ["t"]|tokens_env = "{UNSET}"',
        "tokens_env",
        "accounts.acme.tokens_env",
        f"environment variable {UNSET} is not set",
    ),
    "password_env unset": (
        f'[catch_up]|[alerts]\npassword_env = "{UNSET}"\n\n[catch_up]',
        "password_env",
        "alerts.password_env",
        f"environment variable {UNSET} is not set",
    ),
    "tokens_file unreadable": (
        'tokens = ["t"]|tokens_file = "/nonexistent/firehosed-tokens"',
        "tokens_file",
        "accounts.acme.tokens_file",
        "cannot read /nonexistent/firehosed-tokens",
    ),
    # Paths: a prefix or a file name must never lead out of the channel's root.
    "fallback prefix climbing out of the channel": (
        '[catch_up]|[fallback]\nchannel = "local"\nprefix = "../{account}/"\n\n[catch_up]',
        'prefix = "../',
        "fallback.prefix",
        "a relative path without '..'",
    ),
    "fallback prefix with an unknown placeholder": (
        '[catch_up]|[fallback]\nchannel = "local"\nprefix = "{firehose}/"\n\n[catch_up]',
        'prefix = "{firehose}/"',
        "fallback.prefix",
        "the only placeholder is {account}",
    ),
    "absolute firehose prefix": (
        'format = "json"|format = "json"\nprefix = "/etc/cron.d/"',
        "prefix",
        "firehoses.f.prefix",
        "a relative path",
    ),
    "firehose prefix with CR LF": (
        'format = "json"|format = "json"\nprefix = "acme\\r\\nX-Injected: 1/"',
        "prefix",
        "firehoses.f.prefix",
        "control character",
    ),
    "firehose prefix with a NUL": (
        'format = "json"|format = "json"\nprefix = "acme\\u0000/"',
        "prefix",
        "firehoses.f.prefix",
        "control character",
    ),
    "firehose prefix with a backslash": (
        'format = "json"|format = "json"\nprefix = "..\\\\..\\\\"',
        "prefix",
        "firehoses.f.prefix",
        "'\\'",
    ),
    "filename_pattern with %D (slashes)": (
        'format = "json"|format = "json"\nfilename_pattern = "fh-%D"',
        "filename_pattern",
        "firehoses.f.filename_pattern",
        "%D",
    ),
    "filename_pattern with %n (a newline)": (
        'format = "json"|format = "json"\nfilename_pattern = "fh-%n%Y"',
        "filename_pattern",
        "firehoses.f.filename_pattern",
        "%n",
    ),
    "filename_pattern with %c (spaces, colons and slashes by locale)": (
        'format = "json"|format = "json"\nfilename_pattern = "fh-%c"',
        "filename_pattern",
        "firehoses.f.filename_pattern",
        "%c",
    ),
    "filename_pattern with a tab": (
        'format = "json"|format = "json"\nfilename_pattern = "fh\\t%Y"',
        "filename_pattern",
        "firehoses.f.filename_pattern",
        "control character",
    ),
    "filename_pattern ending in a lone %": (
        'format = "json"|format = "json"\nfilename_pattern = "fh-%Y%"',
        "filename_pattern",
        "firehoses.f.filename_pattern",
        "lone '%'",
    ),
    "s3 prefix with a newline": (
        'type = "directory"\npath = "./export"|type = "s3"\nbucket = "b"\nprefix = "a\\nb/"',
        'prefix = "a',
        "channels.local.prefix",
        "control character",
    ),
    # [alerts] is validated at load, not when the first alert is mailed.
    "alerts smtp port out of range": (
        '[catch_up]|[alerts]\nsmtp = "mail.example.com:99999"\n\n[catch_up]',
        "smtp =",
        "alerts.smtp",
        'expected "host:port"',
    ),
    "alerts smtp not an address": (
        '[catch_up]|[alerts]\nsmtp = "mail example com"\n\n[catch_up]',
        "smtp =",
        "alerts.smtp",
        'expected "host:port"',
    ),
    "alerts smtp on the SMTPS port": (
        '[catch_up]|[alerts]\nsmtp = "mail.example.com:465"\nstarttls = true\n\n[catch_up]',
        "smtp =",
        "alerts.smtp",
        "port 465",
    ),
    "alerts password without username": (
        '[catch_up]|[alerts]\npassword = "pw"\n\n[catch_up]',
        "password =",
        "alerts.password",
        "needs username",
    ),
    "alerts username without password": (
        '[catch_up]|[alerts]\nusername = "u"\n\n[catch_up]',
        "username =",
        "alerts.username",
        "needs password",
    ),
    "alerts allow_plaintext_login with starttls": (
        '[catch_up]|[alerts]\nstarttls = true\nusername = "u"\npassword = "pw"\n'
        "allow_plaintext_login = true\n\n[catch_up]",
        "allow_plaintext_login",
        "alerts.allow_plaintext_login",
        "starttls = true",
    ),
    "zip-csv without schedule": (
        'format = "json"|format = "zip-csv"',
        'format = "zip-csv"',
        "firehoses.f.format",
        'set schedule = "daily"',
    ),
    "schedule without zip-csv": (
        'format = "json"|format = "json"\nschedule = "daily"',
        "schedule =",
        "firehoses.f.schedule",
        'needs format = "zip-csv"',
    ),
    "archive with gzip": (
        'format = "json"|format = "zip-csv"\nschedule = "daily"\ncompression = "gzip"',
        "compression =",
        "firehoses.f.compression",
        "compressed already",
    ),
    "unknown time zone": (
        'format = "json"|format = "zip-csv"\nschedule = "daily"\ntimezone = "Asia/Atlantis"',
        "timezone =",
        "firehoses.f.timezone",
        "unknown time zone 'Asia/Atlantis'",
    ),
    "deliver_by not a time": (
        'format = "json"|format = "zip-csv"\nschedule = "daily"\ndeliver_by = "7am"',
        "deliver_by =",
        "firehoses.f.deliver_by",
        "HH:MM",
    ),
    "archive_name with a slash": (
        'format = "json"|format = "zip-csv"\nschedule = "daily"\narchive_name = "{account}/%d"',
        "archive_name =",
        "firehoses.f.archive_name",
        "without '/'",
    ),
    "archive_name with another placeholder": (
        'format = "json"|format = "zip-csv"\nschedule = "daily"\narchive_name = "{day}"',
        "archive_name =",
        "firehoses.f.archive_name",
        "only placeholder is {account}",
    ),
    "event name unsafe as a file name": (
        'format = "json"|format = "zip-csv"\nschedule = "daily"\nevent_names = { c = "cart/add" }',
        "event_names =",
        "firehoses.f.event_names.c",
        "must be a file name",
    ),
    "archive to a stream channel": (
        '[firehoses.f]\naccount = "acme"\nchannel = "local"\nformat = "json"|'
        '[channels.hook]\ntype = "webhook"\nurl = "https://example.com/in"\n\n'
        '[firehoses.f]\naccount = "acme"\nchannel = "hook"\nformat = "zip-csv"\n'
        'schedule = "daily"',
        'channel = "hook"',
        "firehoses.f.channel",
        "needs a file channel",
    ),
    "import: a bad cron": (
        IMPORT + 'pattern = "x-*.csv"\nschedule = "61 8 * * *"',
        "schedule",
        "imports.i.schedule",
        "not a cron expression",
    ),
    "import: a cron of 6 fields": (
        IMPORT + 'pattern = "x-*.csv"\nschedule = "0 30 8 * * *"',
        "schedule",
        "imports.i.schedule",
        "has 5 fields",
    ),
    "import: an unknown zone": (
        IMPORT + 'pattern = "x-*.csv"\nonce = true\ntimezone = "Mars/Olympus"',
        "timezone",
        "imports.i.timezone",
        "unknown time zone",
    ),
    "import: an offset in hours": (
        IMPORT + 'pattern = "x-*.csv"\nonce = true\noffset = "-12h"',
        "offset",
        "imports.i.offset",
        "whole days",
    ),
    "import: a glob in a directory": (
        IMPORT + 'pattern = "*/x.csv"\nonce = true',
        "pattern",
        "imports.i.pattern",
        "only the file name",
    ),
    "import: an unclosed quote in a date pattern": (
        IMPORT + 'pattern = "\'x-yyyy.csv"\nonce = true',
        "pattern",
        "imports.i.pattern",
        "never closed",
    ),
    "import: a source without a schedule": (
        IMPORT + 'pattern = "x-*.csv"',
        "[imports.i]",
        "imports.i.schedule",
        "needs a schedule",
    ),
    "import: a column for no envelope field": (
        IMPORT + 'pattern = "x.csv"\nonce = true\ncolumns = { kind = "e" }',
        "columns",
        "imports.i.columns.kind",
        "not an envelope field",
    ),
    "import: one column for two fields": (
        IMPORT + 'pattern = "x.csv"\nonce = true\ncolumns = { person = "session" }',
        "columns",
        "imports.i.columns",
        "would hold two envelope fields",
    ),
    "import: a rate of 0": (
        IMPORT + 'pattern = "x.csv"\nonce = true\nrows_per_second = 0',
        "rows_per_second",
        "imports.i.rows_per_second",
        "at least 1",
    ),
    "alerts allow_plaintext_login without a login": (
        "[catch_up]|[alerts]\nallow_plaintext_login = true\n\n[catch_up]",
        "allow_plaintext_login",
        "alerts.allow_plaintext_login",
        "no username",
    ),
}


def edited(edit: str) -> str:
    old, new = edit.split("|")
    assert old in VALID, old
    return VALID.replace(old, new, 1)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_each_problem_is_reported_with_file_line_and_key(
    tmp_path: Path, case: tuple[str, str, str, str]
) -> None:
    edit, needle, key, message = case
    text = edited(edit)
    path = write(tmp_path, text)
    assert_problems(check(path), path, expected_line(path, text, needle, key, message))


@pytest.mark.parametrize(
    "pattern",
    ["firehose-%Y-%m-%d-%H-%M-%S-%f", "events_%F_%H%M%S_%f", "%G-W%V-%u_%j", "x-%%-%y%m%d-%a%b"],
)
def test_filename_patterns_of_safe_directives_pass(tmp_path: Path, pattern: str) -> None:
    text = VALID.replace('format = "json"', f'format = "json"\nfilename_pattern = "{pattern}"')
    result = check(write(tmp_path, text))
    assert result.returncode == 0, result.stderr


def service_account() -> str:
    """A service-account key file (JSON) with a fresh RSA key and Google's token URI."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    info = {
        "type": "service_account",
        "private_key_id": "k1",
        "private_key": pem.decode(),
        "client_email": "firehosed@p.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    return json.dumps(info)


WARNED = (
    VALID
    + """
[alerts]
username = "alerts"
password = "smtp-pw"
allow_plaintext_login = true

[channels.hook_userinfo]
type = "webhook"
url = "http://user:url-pw@hooks.example.com/in"

[channels.hook_header]
type = "webhook"
url = "http://hooks.example.com/in"
headers = { X-Api-Key = "hdr-secret" }

[channels.hook_tls]
type = "webhook"
url = "https://hooks.example.com/in"
headers = { Authorization = "Bearer x" }

[channels.pubsub_plain]
type = "pubsub"
topic = "projects/p/topics/signals"
endpoint = "http://pubsub.example.com"
credentials_file = "{key}"
"""
)


def test_credentials_bound_for_clear_text_are_warned_about_not_refused(
    tmp_path: Path,
) -> None:
    """Exit 0 (a private network may be meant), one `FILE:LINE: key: warning: ...` line
    each, never the secret itself; an https:// URL gets no warning."""
    key = write(tmp_path, service_account(), "sa.json")
    text = WARNED.replace("{key}", str(key))
    path = write(tmp_path, text)
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok")
    lines = result.stderr.splitlines()
    for needle, key_name, message in [
        ("allow_plaintext_login", "alerts.allow_plaintext_login", "in clear"),
        ("http://user:url-pw@", "channels.hook_userinfo.url", "http://"),
        ("X-Api-Key", "channels.hook_header.headers", "X-Api-Key"),
        ('endpoint = "http://', "channels.pubsub_plain.endpoint", "http://"),
    ]:
        wanted = re.compile(
            re.escape(f"{path}:{line_of(text, needle)}: {key_name}: warning: ")
            + r".*"
            + re.escape(message)
            + r".*"
        )
        assert any(wanted.fullmatch(line) for line in lines), (wanted.pattern, lines)
    assert len(lines) == 4, lines
    assert not any(secret in result.stderr for secret in ("url-pw", "hdr-secret", "smtp-pw"))


def test_a_filename_pattern_whose_names_come_back_is_warned_about(tmp_path: Path) -> None:
    """`%H-%M` names tomorrow's 10:00 file as today's: the later replaces the earlier at
    the destination. A pattern whose text never comes back (a date, or no time at all:
    a suffix counts on) is fine."""
    for pattern, warned in [
        ("%H-%M", True),
        ("cart-%m-%d-%H", True),
        ("%Y-%m-%d", False),
        ("firehose-%Y-%j-%H%M%S", False),
        ("batch", False),
    ]:
        text = VALID + f'filename_pattern = "{pattern}"\n'
        path = write(tmp_path, text)
        result = check(path)
        assert result.returncode == 0, result.stderr
        lines = result.stderr.splitlines()
        if not warned:
            assert lines == [], (pattern, lines)
            continue
        (line,) = lines
        prefix = f"{path}:{line_of(text, 'filename_pattern')}: firehoses.f.filename_pattern: "
        assert line.startswith(prefix + f"warning: names repeat: {pattern!r}"), line
        assert "replaces the earlier" in line


def test_a_toml_syntax_error_names_its_line(tmp_path: Path) -> None:
    text = VALID.replace("[catch_up]", "[catch_up\nbroken = ")
    path = write(tmp_path, text)
    lines = assert_problems(check(path), path)
    assert len(lines) == 1
    assert re.fullmatch(re.escape(f"{path}:{line_of(text, '[catch_up')}: ") + r".*", lines[0])
    text = VALID.replace("signals_per_session = 10", "signals_per_session = ")
    path = write(tmp_path, text)
    (line,) = assert_problems(check(path), path)
    assert line.startswith(f"{path}:{line_of(text, 'signals_per_session')}: ")


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    (line,) = assert_problems(check(path), path)
    assert "cannot read" in line


# -- several problems ------------------------------------------------------------------

SEVERAL = """\
[server]
listen = "127.0.0.1:8080"
max_body = "lots"
drain_timeout = "soon"
colour = "blue"

[catch_up]
signals_per_session = "many"

[accounts.acme]
tokens = ["t"]

[channels.local]
type = "directory"
path = "./export"

[channels.odd]
type = "gopher"

[firehoses.f]
account = "acme"
channel = "local"
format = "json"
minutes_between_files = "often"
"""


def test_several_problems_are_all_printed(tmp_path: Path) -> None:
    path = write(tmp_path, SEVERAL)
    expected = [
        ("lots", "server.max_body", "invalid size 'lots'"),
        ("soon", "server.drain_timeout", "invalid duration 'soon'"),
        ("colour", "server.colour", "unknown key"),
        ("many", "catch_up.signals_per_session", "Expected `int`"),
        ("gopher", "channels.odd.type", "got 'gopher'"),
        ("often", "firehoses.f.minutes_between_files", "Expected `float`"),
    ]
    lines = assert_problems(
        check(path), path, *(expected_line(path, SEVERAL, *e) for e in expected)
    )
    assert len(lines) == len(expected)


MIXED = """\
[server]
listen = "127.0.0.1:8080"
colour = "blue"

[accounts.acme]
tokens_env = "{unset}"

[channels.local]
type = "directory"
path = "./export"

[firehoses.f]
account = "acme"
channel = "nowhere"
format = "csv"
"""


def test_problems_of_every_kind_are_printed_together(tmp_path: Path) -> None:
    """A typo in one table must not hide a dangling reference or a missing secret in another:
    a person fixes everything in one pass."""
    text = MIXED.format(unset=UNSET)
    path = write(tmp_path, text)
    assert_problems(
        check(path),
        path,
        expected_line(path, text, "colour", "server.colour", "unknown key"),
        expected_line(path, text, "tokens_env", "accounts.acme.tokens_env", UNSET),
        expected_line(path, text, "nowhere", "firehoses.f.channel", "no channel named"),
        expected_line(path, text, 'format = "csv"', "firehoses.f.format", "csv needs a mapping"),
    )


# -- run and reload --------------------------------------------------------------------


def test_run_refuses_an_invalid_config_with_the_same_lines(tmp_path: Path) -> None:
    path = write(tmp_path, SEVERAL)
    checked = check(path)
    run = subprocess.run(
        [sys.executable, "-m", "firehosed", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines() == checked.stderr.splitlines()
    assert not (tmp_path / "var").exists()  # refused before touching storage


def test_sighup_with_a_broken_config_keeps_the_old_one_and_logs_each_problem(
    make_daemon,
) -> None:
    firehose = textwrap.dedent(
        """
        [firehoses.files]
        account = "acme"
        channel = "local"
        format = "ndjson"
        minutes_between_files = 0.01
        """
    )
    daemon = make_daemon(firehose).start()
    broken_base = BASE_CONFIG.replace('drain_timeout = "10s"', 'drain_timeout = "soon"')
    broken = firehose.replace('channel = "local"', 'channel = "local"\ncolour = "red"')
    daemon.write_config(broken, base=broken_base)
    text = daemon.config_path.read_text()
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.events("config.reload_rejected"))
    problems = [e["problem"] for e in daemon.events("config.invalid")]
    path = daemon.config_path
    for pattern in (
        expected_line(path, text, "soon", "server.drain_timeout", "invalid duration 'soon'"),
        expected_line(path, text, "colour", "firehoses.files.colour", "unknown key"),
    ):
        assert any(pattern.fullmatch(p) for p in problems), (pattern.pattern, problems)
    assert len(problems) == 2
    # the old config still serves: accepted and delivered
    assert daemon.get("/readyz").status_code == 200
    assert daemon.post([signal_record(1)]).status_code == 202
    wait_until(lambda: len(daemon.delivered()) == 1)
    assert not daemon.events("config.reloaded")
    # and a fixed file is taken by the next SIGHUP
    daemon.write_config(firehose)
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.events("config.reloaded"))
    assert daemon.stop() == 0
