"""The TOML configuration, decoded once into msgspec Structs and validated up front.

Every problem is reported as `FILE:LINE: key: message`, all of them at once, so that
`firehosed check` and a SIGHUP reload tell a person everything to fix in one pass.
Secrets are never required in the file: a key `X_env` reads X from an environment
variable, a key `X_file` reads it from a file (systemd `LoadCredential=`).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from datetime import time as dt_time
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError

from firehosed import channels
from firehosed.errors import ConfigError
from firehosed.fields import FieldsConfig, Section
from firehosed.imports import pattern as import_pattern
from firehosed.names import control_character, path_problem
from firehosed.units import Duration, Size, dec_hook

MiB = 1 << 20
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
AVRO_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FILE_ONLY = ("zip-csv", "avro", "parquet")  # formats a stream channel cannot carry
# The strftime directives a `filename_pattern` may use: each gives (UTC, C locale) only
# digits, ASCII letters, "-" or "+". Refused: %D %x %c (slashes, spaces), %n %t (control
# characters), %e %k %l (space padding), %s (local time), %T %R %r (colons), %E/%O forms.
FILENAME_DIRECTIVES = "%YyCGgmdjHIMSfFpaAbBhuwUWVzZ"
_SAMPLE_TIME = datetime(2026, 12, 31, 23, 59, 59, 999999, UTC)
_SMTP_ADDRESS = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]\s]+))(?::(?P<port>\d{1,5}))?"
)
SMTPS_PORT = 465


class ServerConfig(Section):
    """`[server]`: where the HTTP receiver listens and what it accepts."""

    listen: str = "127.0.0.1:8080"
    max_body: Size = Size(10 * MiB)
    max_upload: Size = Size(1024 * MiB)  # import uploads, streamed to disk
    # Import files (of 8 MiB or more) read in child processes at once, at most: their
    # rows are parsed and checked there, on another core; 0: all in the daemon's threads.
    import_processes: int = 1
    drain_timeout: Duration = Duration(10.0)
    # A connection without a complete request head this long after it opened (or after
    # its last answer) is closed: idle keep-alive, silent and slowloris clients alike.
    idle_timeout: Duration = Duration(60.0)
    # A request's whole body must arrive within this, else 408 and the connection closes.
    body_timeout: Duration = Duration(60.0)


class AdminConfig(Section):
    """`[admin]`: the operators' listener (status page, metrics, status, tail, replay,
    reload), never the one sources reach."""

    listen: str = "127.0.0.1:8081"
    # A bearer token every admin route then needs; none: only the address guards it.
    token: str | None = None
    token_env: str | None = None
    token_file: str | None = None
    idle_timeout: Duration = Duration(60.0)


class StorageConfig(Section):
    """`[storage]`: the durable queues, batches and dead letters."""

    backend: Literal["local", "jetstream"] = "local"
    dir: str = "./var"
    durability: Literal["fsync", "write", "memory"] = "fsync"
    max_disk: Size = Size(10 * 1024 * MiB)
    segment_size: Size = Size(64 * MiB)


class JetStreamConfig(Section):
    """`[jetstream]`: the NATS JetStream cluster of `storage.backend = "jetstream"`."""

    servers: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    creds_file: str | None = None
    user: str | None = None
    password: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    token: str | None = None
    token_env: str | None = None
    token_file: str | None = None
    replicas: int = 3
    partitions: int = 16
    # The servers' monitoring endpoints (`http: 8222` in their config): needed with
    # replicas = 1, to check that every server syncs each write (sync_interval: always).
    monitor: list[str] = msgspec.field(default_factory=list)
    # A process that has not renewed a lease (partition, firehose cutter) this long
    # loses it to another.
    lease_ttl: Duration = Duration(10.0)
    # Names of the streams and buckets: `<prefix>_SIGNALS`, `<prefix>-leases`, ...
    # (several deployments may share a cluster).
    prefix: str = "firehosed"
    # An unanswered publish or request to the cluster fails after this (503 at ingest).
    timeout: Duration = Duration(5.0)


class CatchUpConfig(Section):
    """`[catch_up]`: the per-session ring of anonymous signals re-sent on identification."""

    signals_per_session: int = 30
    session_ttl: Duration = Duration(24 * 3600.0)
    max_memory: Size = Size(512 * MiB)


class AlertsConfig(Section, rename={"from_": "from"}):
    """`[alerts]`: the SMTP server for error-alert e-mails.

    `starttls = true` requires STARTTLS. With a login (`username`), STARTTLS is used
    whenever the server offers it, and the password is never sent without TLS unless
    `allow_plaintext_login` is set. Without a login and with `starttls = false`, mail
    goes in plain text (a local relay).
    """

    smtp: str = "localhost:25"
    from_: str = "firehosed@localhost"
    starttls: bool = False
    allow_plaintext_login: bool = False
    username: str | None = None
    password: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    every: Duration = Duration(15 * 60.0)
    timeout: Duration = Duration(30.0)


class FallbackConfig(Section):
    """`[fallback]`: the channel for accounts with no firehose of their own."""

    channel: str | None = None
    prefix: str = "{account}/Firehose/"


class AccountConfig(Section):
    """`[accounts.X]`: one customer: who may post, and how its signals are read."""

    tokens: list[str] = msgspec.field(default_factory=list)
    tokens_env: str | None = None
    tokens_file: str | None = None
    firehose_enabled: bool = True
    dedupe_window: Duration = Duration(600.0)
    dedupe_max: int = 1_000_000
    dedupe_max_memory: Size = Size(256 * MiB)
    fields: FieldsConfig = msgspec.field(default_factory=FieldsConfig)


class FirehoseConfig(Section):
    """`[firehoses.X]`: which signals of an account go where, in what shape, how often."""

    account: str
    channel: str
    format: Literal["json", "ndjson", "csv", "avro", "parquet", "zip-csv"] = "json"
    mapping: str | None = None
    # None: the format's default (formats.COMPRESSIONS): none, avro deflate, parquet snappy.
    compression: Literal["none", "gzip", "deflate", "snappy", "zstd"] | None = None
    minutes_between_files: float = 5.0
    max_file: Size = Size(64 * MiB)
    filename_pattern: str = "firehose-%Y-%m-%d-%H-%M-%S-%f"
    types: list[str] = msgspec.field(default_factory=list)
    include_anonymous: bool = True
    catch_up: bool = False
    send_person_identified: bool = False
    paused: bool = False
    error_alert_email: str | None = None
    alert_after: Duration = Duration(300.0)
    retry_for: Duration = Duration(24 * 3600.0)
    delivery_timeout: Duration = Duration(600.0)
    dead_letter: str | None = None
    # A path under the channel's root for this firehose's files ("acme/Firehose/").
    prefix: str = ""
    # Bytes this firehose may hold queued before its account's requests get 503; None:
    # half of storage.max_disk when the config has several firehoses, else all of it.
    max_queued: Size | None = None
    # The daily archive (format "zip-csv"): one zip per day, in `timezone`, by
    # `deliver_by` (local "HH:MM" on the next day), named `archive_name` (strftime of
    # the day, {account}; ".zip" added), one CSV per type named by `event_names`.
    schedule: Literal["daily"] | None = None
    timezone: str = "UTC"
    deliver_by: str | None = None
    archive_name: str = "{account}_%d%m%Y"
    event_names: dict[str, str] = msgspec.field(default_factory=dict)


class ImportConfig(Section):
    """`[imports.X]`: a task that pulls files of past events from `source` on its cron
    `schedule` (or takes uploads) into an account's pipeline (imports/)."""

    account: str
    # A file channel (directory, sftp, ftp, ftpes, s3) to pull from; None: uploads only.
    source: str | None = None
    pattern: str | None = None  # the files a run takes (imports/pattern.py)
    format: Literal["csv", "ndjson", "json", "avro"] = "csv"
    # Envelope field (type, id, session, person, time) -> the column that holds it.
    columns: dict[str, str] = msgspec.field(default_factory=dict)
    schedule: str | None = None  # cron, 5 fields, in `timezone`
    timezone: str = "UTC"
    offset: str = "0d"  # the run's day: the schedule's day plus this ("-1d", "+0d")
    status: Literal["draft", "launched", "paused"] = "launched"
    ends: datetime | None = None  # no run starts after this
    once: bool = False  # a one-time task: completed after its first run
    # At most this many rows a second (None: as fast as the pipeline takes them): an
    # import writes to the same disk as ingest's fsyncs, and slows them (README).
    rows_per_second: int | None = None


IMPORT_FIELDS = ("type", "id", "session", "person", "time")
IMPORT_SOURCES = ("directory", "sftp", "ftp", "ftpes", "s3")
_OFFSET = re.compile(r"([+-]?)(\d+)d")


def import_offset(text: str) -> int | None:
    """An import `offset` ("-1d") in days, or None when it is not one."""
    match = _OFFSET.fullmatch(text)
    return None if match is None else int(match[2]) * (-1 if match[1] == "-" else 1)


class ChannelConfig:
    """Marker for a `[channels.X]` table: its Struct is chosen by its `type` key."""


class Config(msgspec.Struct, kw_only=True):
    """The whole decoded, validated configuration."""

    path: str
    server: ServerConfig
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    storage: StorageConfig
    jetstream: JetStreamConfig = msgspec.field(default_factory=JetStreamConfig)
    catch_up: CatchUpConfig
    alerts: AlertsConfig
    fallback: FallbackConfig
    accounts: dict[str, AccountConfig]
    channels: dict[str, Any]
    mappings: dict[str, dict[str, str]]
    firehoses: dict[str, FirehoseConfig]
    imports: dict[str, ImportConfig] = msgspec.field(default_factory=dict)
    # `FILE:LINE: key: warning: message` each: allowed, but likely not what was meant.
    warnings: list[str] = msgspec.field(default_factory=list)

    def all_firehoses(self) -> dict[str, FirehoseConfig]:
        """Configured firehoses plus a fallback firehose per account that needs one."""
        result = dict(self.firehoses)
        owners = {f.account for f in self.firehoses.values()}
        if self.fallback.channel is None:
            return result
        for account, cfg in self.accounts.items():
            if cfg.firehose_enabled and account not in owners:
                result[f"fallback.{account}"] = FirehoseConfig(
                    account=account,
                    channel=self.fallback.channel,
                    format="json",
                    catch_up=True,
                    include_anonymous=True,
                    prefix=self.fallback.prefix.replace("{account}", account),
                )
        return result


_SECTIONS: dict[str, type[Section]] = {
    "server": ServerConfig,
    "admin": AdminConfig,
    "storage": StorageConfig,
    "jetstream": JetStreamConfig,
    "catch_up": CatchUpConfig,
    "alerts": AlertsConfig,
    "fallback": FallbackConfig,
}
_TABLES: dict[str, Any] = {
    "accounts": AccountConfig,
    "channels": ChannelConfig,
    "mappings": dict[str, str],
    "firehoses": FirehoseConfig,
    "imports": ImportConfig,
}


def default_path() -> str:
    """`$FIREHOSED_CONFIG`, else `./config.toml`."""
    return os.environ.get("FIREHOSED_CONFIG", "config.toml")


def load(path: str | os.PathLike[str]) -> Config:
    """Read, decode and validate the config file; raise ConfigError listing every problem."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}:1: cannot read config: {exc}"]) from exc
    return parse(text, path)


def parse(text: str, path: str = "config.toml") -> Config:
    """Decode and validate config text; `path` is used in error messages."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise ConfigError([f"{path}:{line.group(1) if line else 1}: syntax: {exc}"]) from exc
    report = _Report(path, text)
    decoded = _decode(raw, report)
    # Keep checking what did decode (a section that failed counts as its defaults, an
    # entry that failed is left out but its name still exists), so one pass reports
    # every kind of problem.
    names = {table: set(decoded[table]) for table in _TABLES}
    for section, struct in _SECTIONS.items():
        decoded[section] = decoded[section] or struct()
    for table in _TABLES:
        decoded[table] = {k: v for k, v in decoded[table].items() if v is not None}
    config = Config(path=path, **decoded)
    _resolve_secrets(config, report)
    _validate(config, report, names)
    if report.problems:
        raise ConfigError(report.problems)
    config.warnings = report.warnings
    return config


class _Report:
    """Collects problems, each located at the line where its key (or table) is written."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = _key_lines(text)
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def add(self, key: tuple[str, ...], message: str) -> None:
        self.problems.append(self._located(key, message))

    def warn(self, key: tuple[str, ...], message: str) -> None:
        self.warnings.append(self._located(key, f"warning: {message}"))

    def _located(self, key: tuple[str, ...], message: str) -> str:
        line = 1
        for n in range(len(key), 0, -1):
            if key[:n] in self.lines:
                line = self.lines[key[:n]]
                break
        return f"{self.path}:{line}: {'.'.join(key)}: {message}"


def _decode(raw: dict[str, Any], report: _Report) -> dict[str, Any]:
    decoded: dict[str, Any] = {}
    for key in raw.keys() - _SECTIONS.keys() - _TABLES.keys():
        report.add((key,), "unknown section")
    for name, struct in _SECTIONS.items():
        decoded[name] = _convert(raw.get(name, {}), struct, (name,), report)
    for name, entry_type in _TABLES.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            report.add((name,), "expected a table")
            table = {}
        decoded[name] = {}
        for entry, value in table.items():
            if not NAME.fullmatch(entry):
                report.add((name, entry), "names may use letters, digits, '_', '-' and '.'")
            decoded[name][entry] = _convert(value, entry_type, (name, entry), report)
    return decoded


_AT = re.compile(r"^(.*) - at `\$[^`]*`$", re.DOTALL)


def _convert(value: Any, type_: Any, key: tuple[str, ...], report: _Report) -> Any:
    """Convert one TOML value, reporting every bad key of a table, not just the first."""
    struct = _struct_type(value, type_, key, report)
    if struct is _REPORTED:
        return None
    if struct is None:
        return _convert_value(value, type_, key, report)
    if not isinstance(value, dict):
        report.add(key, "expected a table")
        return None
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    tag_field = struct.__struct_config__.tag_field
    count = len(report.problems)
    for name, item in value.items():
        field = fields.get(name)
        if name == tag_field:
            continue
        if field is None:
            report.add((*key, name), "unknown key")
        else:
            _convert(item, field.type, (*key, name), report)
    for name, field in fields.items():
        if field.required and name not in value:
            report.add(key, f"missing required key {name!r}")
    if len(report.problems) > count:
        return None
    return _convert_value(value, struct, key, report)


_REPORTED = object()


def _struct_type(value: Any, type_: Any, key: tuple[str, ...], report: _Report) -> Any:
    """The Struct class for `value`: `type_` itself, or the channel Struct its type names."""
    if type_ is ChannelConfig:
        tag = value.get("type") if isinstance(value, dict) else None
        if tag not in channels.REGISTRY:
            known = ", ".join(sorted(channels.REGISTRY))
            report.add((*key, "type"), f"expected one of {known}, got {tag!r}")
            return _REPORTED
        return channels.config_type(tag)
    if isinstance(type_, type) and issubclass(type_, msgspec.Struct):
        return type_
    return None


def _convert_value(value: Any, type_: Any, key: tuple[str, ...], report: _Report) -> Any:
    try:
        return msgspec.convert(value, type_, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if m := _AT.match(message):
            message = m.group(1)
        report.add(key, message)
        return None


def _resolve_secrets(config: Config, report: _Report) -> None:
    """Fill `X` from `X_env` / `X_file` on every table that offers them."""
    tables: list[tuple[tuple[str, ...], msgspec.Struct]] = [(("alerts",), config.alerts)]
    tables.append((("admin",), config.admin))
    if config.storage.backend == "jetstream":
        tables.append((("jetstream",), config.jetstream))
    tables += [(("accounts", k), v) for k, v in config.accounts.items()]
    tables += [(("channels", k), v) for k, v in config.channels.items()]
    for key, table in tables:
        for field in msgspec.structs.fields(table):
            if field.name.endswith(("_env", "_file")) and field.name != "creds_file":
                _resolve_one(table, field.name, key, report)


def _resolve_one(table: msgspec.Struct, name: str, key: tuple[str, ...], report: _Report) -> None:
    source = getattr(table, name)
    target = name.rsplit("_", 1)[0]
    if source is None or not hasattr(table, target):
        return
    if getattr(table, target) not in (None, []):
        report.add((*key, name), f"set either {target} or {name}, not both")
        return
    if name.endswith("_env"):
        secret = os.environ.get(source)
        if secret is None:
            report.add((*key, name), f"environment variable {source} is not set")
            return
    else:
        try:
            secret = Path(source).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            report.add((*key, name), f"cannot read {source}: {exc.__class__.__name__}")
            return
    if isinstance(getattr(table, target), list) or target == "tokens":
        setattr(table, target, [t for t in re.split(r"[,\s]+", secret) if t])
    else:
        setattr(table, target, secret)


def _validate(config: Config, report: _Report, names: dict[str, set[str]]) -> None:
    _validate_server(config, report)
    _validate_admin(config, report)
    _validate_accounts(config, report)
    for name, mapping in config.mappings.items():
        if not mapping:
            report.add(("mappings", name), "a mapping needs at least one column")
        for column, path in mapping.items():
            if not path or "" in path.split("."):
                report.add(("mappings", name, column), f"invalid path {path!r}")
    _validate_alerts(config.alerts, report)
    for name, channel in config.channels.items():
        _validate_channel(("channels", name), channel, report)
    _validate_fallback(config.fallback, names, report)
    for name, firehose in config.firehoses.items():
        _validate_firehose(names, ("firehoses", name), firehose, report)
        _validate_file_format(config, ("firehoses", name), firehose, report)
    for name, task in config.imports.items():
        _validate_import(config, ("imports", name), task, report)


def _validate_file_format(
    config: Config, key: tuple[str, ...], firehose: FirehoseConfig, report: _Report
) -> None:
    """The formats only a file channel can take, and the column names Avro can take."""
    channel = config.channels.get(firehose.channel)
    if firehose.format in FILE_ONLY and channel is not None and _streams(channel):
        what = "a daily archive needs" if firehose.format == "zip-csv" else "its files need"
        report.add(
            (*key, "channel"),
            f"channel {firehose.channel!r} streams records: {what} a file channel "
            "(directory, sftp, ftp, ftpes or s3)",
        )
    columns = config.mappings.get(firehose.mapping or "", {})
    if firehose.format == "avro":
        for column in columns:
            if not AVRO_NAME.fullmatch(column):
                report.add(
                    (*key, "mapping"),
                    f"column {column!r} of mapping {firehose.mapping!r} is not an Avro field "
                    "name (a letter or '_', then letters, digits or '_')",
                )


def _streams(channel: Any) -> bool:
    """Whether a channel config is of a stream type (webhook, queues)."""
    kind = type(channel).__struct_config__.tag
    return bool(channels.REGISTRY[kind].channel_type().stream)


def _validate_channel(key: tuple[str, ...], channel: Any, report: _Report) -> None:
    # A channel config may check its own cross-key rules: `problems()` yields (key,
    # message); `warnings()` likewise, for what is allowed but likely not meant.
    for name, message in getattr(channel, "problems", tuple)():
        report.add((*key, name), message)
    for name, message in getattr(channel, "warnings", tuple)():
        report.warn((*key, name), message)


def _validate_fallback(
    fallback: FallbackConfig, names: dict[str, set[str]], report: _Report
) -> None:
    if fallback.channel is not None and fallback.channel not in names["channels"]:
        report.add(("fallback", "channel"), f"no channel named {fallback.channel!r}")
    if "{" in fallback.prefix.replace("{account}", ""):
        report.add(("fallback", "prefix"), "the only placeholder is {account}")
    elif (problem := path_problem(fallback.prefix.replace("{account}", "account"))) is not None:
        report.add(("fallback", "prefix"), problem)


def _validate_accounts(config: Config, report: _Report) -> None:
    for name, account in config.accounts.items():
        if not account.tokens:
            report.add(("accounts", name), "no tokens: set tokens, tokens_env or tokens_file")
        paths = {
            f.name: getattr(account.fields, f.name) for f in msgspec.structs.fields(account.fields)
        }
        for field, path in paths.items():
            key = ("accounts", name, "fields", field)
            if not path or "" in path.split("."):
                report.add(key, f"invalid path {path!r}")
            elif clash := [o for o in paths.values() if o.startswith(path + ".")]:
                report.add(key, f"{path!r} cannot be both a value and the parent of {clash[0]!r}")


def smtp_address(value: str) -> tuple[str, int]:
    """Split `alerts.smtp`: "host:port", "[::1]:25", or a bare host for port 25.

    Raises ValueError when the value is none of these.
    """
    m = _SMTP_ADDRESS.fullmatch(value.strip())
    port = int(m.group("port") or 25) if m else 0
    if m is None or not 0 < port < 65536:
        raise ValueError(f'expected "host:port", got {value!r}')
    return m.group("ipv6") or m.group("host"), port


def _validate_alerts(alerts: AlertsConfig, report: _Report) -> None:
    """`[alerts]` is checked here, at load, rather than when the first alert is mailed."""
    try:
        _, port = smtp_address(alerts.smtp)
    except ValueError as exc:
        report.add(("alerts", "smtp"), str(exc))
    else:
        if port == SMTPS_PORT:
            report.add(
                ("alerts", "smtp"),
                "port 465 is SMTPS (TLS from the first byte), which firehosed does not speak: "
                "use the submission port 587 with starttls = true",
            )
    if alerts.password is not None and alerts.username is None:
        report.add(("alerts", _set_key(alerts, "password")), "a password needs username")
    if alerts.username is not None and alerts.password is None:
        report.add(
            ("alerts", "username"), "a login needs password (password, password_env or _file)"
        )
    if alerts.allow_plaintext_login:
        _validate_plaintext_login(alerts, report)


def _validate_plaintext_login(alerts: AlertsConfig, report: _Report) -> None:
    key = ("alerts", "allow_plaintext_login")
    if alerts.starttls:
        report.add(key, "cannot be used with starttls = true, which requires TLS")
    elif alerts.username is None:
        report.add(key, "there is no username: no login to allow")
    else:
        report.warn(key, "the SMTP password is sent in clear when the server offers no STARTTLS")


def _set_key(table: msgspec.Struct, name: str) -> str:
    """`name`, or `name_env` / `name_file` when that is the key the file sets."""
    for key in (f"{name}_env", f"{name}_file"):
        if getattr(table, key, None) is not None:
            return key
    return name


def _validate_server(config: Config, report: _Report) -> None:
    listen = config.server.listen
    if not listen.startswith("unix:"):
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            report.add(
                ("server", "listen"), f'expected "host:port" or "unix:/path", got {listen!r}'
            )
    if config.server.import_processes < 0:
        report.add(("server", "import_processes"), "must be 0 or more (0: read in threads)")
    if config.catch_up.signals_per_session < 1:
        report.add(("catch_up", "signals_per_session"), "must be at least 1")
    if config.storage.segment_size < MiB:
        report.add(("storage", "segment_size"), "must be at least 1MiB")
    _validate_jetstream(config, report)


def _validate_urls(jetstream: JetStreamConfig, report: _Report) -> None:
    """The servers' and monitoring endpoints' URLs."""
    for url in jetstream.servers:
        if not re.fullmatch(r"(nats|tls)://[^\s/]+", url):
            report.add(("jetstream", "servers"), f'expected "nats://host:port", got {url!r}')
    for url in jetstream.monitor:
        if not re.fullmatch(r"https?://[^\s/]+/?", url):
            report.add(("jetstream", "monitor"), f'expected "http://host:port", got {url!r}')


def _validate_jetstream(config: Config, report: _Report) -> None:
    jetstream = config.jetstream
    if config.storage.backend != "jetstream":
        if ("jetstream",) in report.lines:
            report.warn(("jetstream",), 'only read with storage.backend = "jetstream"')
        return
    if not jetstream.servers:
        report.add(("jetstream", "servers"), "needs at least one server URL")
    _validate_urls(jetstream, report)
    if not 1 <= jetstream.replicas <= 5:
        report.add(("jetstream", "replicas"), "must be 1 to 5")
    elif jetstream.replicas == 1 and not jetstream.monitor:
        report.add(
            ("jetstream", "replicas"),
            "1 replica is safe only on servers with sync_interval: always; set monitor to"
            ' their monitoring URLs (e.g. ["http://127.0.0.1:8222"]) so that it is checked',
        )
    if not 1 <= jetstream.partitions <= 1024:
        report.add(("jetstream", "partitions"), "must be 1 to 1024")
    if jetstream.lease_ttl < 1:
        report.add(("jetstream", "lease_ttl"), "must be at least 1s")
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", jetstream.prefix):
        report.add(("jetstream", "prefix"), "letters, digits, '_' and '-', at most 32")
    for name, firehose in config.firehoses.items():
        if firehose.format == "zip-csv":
            report.add(
                ("firehoses", name, "format"),
                "the daily archive keeps its days on local disk: not with storage.backend ="
                ' "jetstream" yet',
            )


def _validate_admin(config: Config, report: _Report) -> None:
    """The admin listener: a valid address, and never the ingest listener's."""
    listen = config.admin.listen
    if not listen.startswith("unix:"):
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            report.add(("admin", "listen"), f'expected "host:port" or "unix:/path", got {listen!r}')
            return
    if _same_listener(listen, config.server.listen):
        report.add(("admin", "listen"), f"must differ from server.listen ({listen!r})")
    if config.admin.token == "":
        report.add(("admin", "token"), "must not be empty")


def _same_listener(a: str, b: str) -> bool:
    """Whether two listen addresses would take the same socket (a wildcard host takes
    every address of its port)."""
    if a.startswith("unix:") or b.startswith("unix:"):
        return a == b
    (host_a, _, port_a), (host_b, _, port_b) = a.rpartition(":"), b.rpartition(":")
    wildcard = {"0.0.0.0", "[::]", "::", "*"}
    return port_a == port_b and (host_a == host_b or bool({host_a, host_b} & wildcard))


def _validate_firehose(
    names: dict[str, set[str]], key: tuple[str, ...], firehose: FirehoseConfig, report: _Report
) -> None:
    refs: Iterable[tuple[str, str | None, set[str]]] = (
        ("account", firehose.account, names["accounts"]),
        ("channel", firehose.channel, names["channels"]),
        ("mapping", firehose.mapping, names["mappings"]),
        ("dead_letter", firehose.dead_letter, names["channels"]),
    )
    for field, ref, table in refs:
        if ref is not None and ref not in table:
            kind = "channel" if field == "dead_letter" else field
            report.add((*key, field), f"no {kind} named {ref!r}")
    if firehose.format == "csv" and firehose.mapping is None:
        report.add((*key, "format"), "csv needs a mapping (the columns)")
    _validate_compression(key, firehose, report)
    if firehose.minutes_between_files <= 0:
        report.add((*key, "minutes_between_files"), "must be greater than 0")
    if firehose.max_file < 1024:
        report.add((*key, "max_file"), "must be at least 1KiB")
    if (problem := path_problem(firehose.prefix)) is not None:
        report.add((*key, "prefix"), problem)
    if (problem := filename_pattern_problem(firehose.filename_pattern)) is not None:
        report.add((*key, "filename_pattern"), problem)
    elif (repeat := repeating_pattern(firehose.filename_pattern)) is not None:
        report.warn((*key, "filename_pattern"), repeat)
    _validate_archive(key, firehose, report)


def _validate_compression(key: tuple[str, ...], firehose: FirehoseConfig, report: _Report) -> None:
    """A compression the format takes (formats.COMPRESSIONS)."""
    # The formats (fastavro...) are no business of a process that only needs the config's
    # types: an import's reading process (imports/child.py) stays 8 MB smaller.
    from firehosed import formats  # noqa: PLC0415

    fmt, given = firehose.format, firehose.compression
    allowed = formats.COMPRESSIONS[fmt]
    if given is None or given in allowed:
        return
    if fmt == "zip-csv":
        message = "zip-csv is compressed already (deflate)"
    elif fmt in ("avro", "parquet"):
        inside = "blocks" if fmt == "avro" else "pages"
        message = (
            f"{fmt} compresses its {inside} itself: use {allowed[0]} (the default) or "
            f"{allowed[1]}, not {given}"
        )
    else:
        message = f"{fmt} files take none (the default) or gzip, not {given}"
    report.add((*key, "compression"), message)


def _validate_archive(key: tuple[str, ...], firehose: FirehoseConfig, report: _Report) -> None:
    """The daily archive's keys: only with format "zip-csv", and each well formed."""
    archive = firehose.format == "zip-csv"
    if archive and firehose.schedule != "daily":
        report.add((*key, "format"), 'zip-csv is a daily archive: set schedule = "daily"')
    if not archive and firehose.schedule is not None:
        report.add((*key, "schedule"), 'schedule = "daily" needs format = "zip-csv"')
    try:
        ZoneInfo(firehose.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        report.add((*key, "timezone"), f"unknown time zone {firehose.timezone!r} (IANA name)")
    if firehose.deliver_by is not None and local_time(firehose.deliver_by) is None:
        report.add((*key, "deliver_by"), 'must be a local time "HH:MM", 00:00 to 23:59')
    name = firehose.archive_name
    if "{" in name.replace("{account}", ""):
        report.add((*key, "archive_name"), "the only placeholder is {account}")
    elif (problem := filename_pattern_problem(name.replace("{account}", "a"))) is not None:
        report.add((*key, "archive_name"), problem)
    for kind, event in firehose.event_names.items():
        if (problem := event_name_problem(event)) is not None:
            report.add((*key, "event_names", kind), problem)


def _validate_import(
    config: Config, key: tuple[str, ...], task: ImportConfig, report: _Report
) -> None:
    """An import task's keys: its account and source exist, its cron, zone, offset and
    pattern read, its columns name envelope fields."""
    if task.account not in config.accounts:
        report.add((*key, "account"), f"no account named {task.account!r}")
    _validate_import_source(config, key, task, report)
    if task.pattern is not None and (problem := import_pattern.problem(task.pattern)):
        report.add((*key, "pattern"), problem)
    if task.schedule is not None and (problem := cron_problem(task.schedule)):
        report.add((*key, "schedule"), problem)
    try:
        ZoneInfo(task.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        report.add((*key, "timezone"), f"unknown time zone {task.timezone!r} (IANA name)")
    if import_offset(task.offset) is None:
        report.add((*key, "offset"), 'must be whole days, like "-1d" or "0d"')
    if task.rows_per_second is not None and task.rows_per_second < 1:
        report.add((*key, "rows_per_second"), "must be at least 1 (leave it out: no limit)")
    if task.ends is not None and task.ends.tzinfo is None:
        report.add((*key, "ends"), 'must name its zone: "2027-06-30T00:00:00Z"')
    for field, column in task.columns.items():
        if field not in IMPORT_FIELDS:
            fields = ", ".join(IMPORT_FIELDS)
            report.add((*key, "columns", field), f"not an envelope field: {fields}")
        elif not column:
            report.add((*key, "columns", field), "must name a column")
    named = [task.columns.get(field, field) for field in IMPORT_FIELDS]
    if twice := sorted({column for column in named if named.count(column) > 1}):
        report.add(
            (*key, "columns"),
            f"column {twice[0]!r} would hold two envelope fields (a field not listed is "
            "read from the column of its own name)",
        )


def _validate_import_source(
    config: Config, key: tuple[str, ...], task: ImportConfig, report: _Report
) -> None:
    """A task's source: a file channel, with a pattern and a schedule (or once)."""
    if task.source is None:
        if task.schedule is not None:
            report.add((*key, "schedule"), "a schedule needs a source to pull from")
        return
    source = config.channels.get(task.source)
    if source is None:
        report.add((*key, "source"), f"no channel named {task.source!r}")
    elif (kind := type(source).__struct_config__.tag) not in IMPORT_SOURCES:
        report.add(
            (*key, "source"),
            f"a {kind} channel cannot be read: use directory, sftp, ftp, ftpes or s3",
        )
    if task.pattern is None:
        report.add((*key, "pattern"), "a task with a source needs a pattern (its files)")
    if task.schedule is None and not task.once:
        report.add((*key, "schedule"), "a task with a source needs a schedule, or once = true")


def cron_problem(expression: str) -> str | None:
    """Why `expression` is not a 5-field cron expression, or None."""
    if len(expression.split()) != 5:
        return "a cron expression has 5 fields: minute hour day-of-month month day-of-week"
    try:
        CronSim(expression, datetime(2026, 1, 1))
    except CronSimError as exc:
        return f"not a cron expression: {exc}"
    return None


def local_time(text: str) -> dt_time | None:
    """A "HH:MM" text as a time of day, or None when it is not one."""
    match = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", text)
    return dt_time(int(match[1]), int(match[2])) if match else None


def event_name_problem(name: str) -> str | None:
    """Why `name` cannot name a CSV in an archive (`{name}_DDMMYYYY.csv`), or None."""
    if not name.strip() or name != name.strip():
        return "must not be empty or start or end with a space"
    if len(name) > 200:
        return "must be at most 200 characters"
    if (bad := control_character(name)) is not None:
        return f"contains a control character ({bad!r})"
    if any(c in name for c in '/\\:*?"<>|'):
        return 'must be a file name: none of / \\ : * ? " < > |'
    return None


def filename_pattern_problem(pattern: str) -> str | None:
    """Why `pattern` cannot make file names, or None: only FILENAME_DIRECTIVES, no '/',
    no '\\', no control character, before or after expansion."""
    if not pattern.strip():
        return "must not be empty"
    text = pattern.replace("%%", "")
    for directive in re.findall(r"%(.?)", text, re.DOTALL):
        if not directive:
            return "ends in a lone '%' (write '%%' for a percent sign)"
        if directive not in FILENAME_DIRECTIVES:
            allowed = " ".join(f"%{d}" for d in FILENAME_DIRECTIVES)
            return f"%{directive} is not allowed in a file name; use {allowed}"
    name = _SAMPLE_TIME.strftime(pattern)
    if (bad := control_character(name)) is not None:
        return f"contains a control character ({bad!r})"
    if "/" in name or "\\" in name:
        return "must be a file name without '/' or '\\' (use prefix for directories)"
    return None


def repeating_pattern(pattern: str) -> str | None:
    """Why names made by `pattern` (valid) repeat, or None. A name stays unique within
    a run of the same text (a suffix counts on: `-1`, `-2`...), not when the text
    changes and later comes back: without its date (or its year), one day's file takes
    the name of an earlier day's and replaces it at the destination."""
    here = _SAMPLE_TIME.strftime(pattern)
    odd = timedelta(seconds=1, microseconds=234567)  # off every whole unit of time
    for days in (1, 7, 31, 365):
        earlier = _SAMPLE_TIME - timedelta(days=days)
        between = (_SAMPLE_TIME - odd, _SAMPLE_TIME - timedelta(days=days) / 2 - odd)
        if earlier.strftime(pattern) == here and any(
            moment.strftime(pattern) != here for moment in between
        ):
            return (
                f"names repeat: {pattern!r} names a file of {earlier:%Y-%m-%d %H:%M} "
                f"as one of {_SAMPLE_TIME:%Y-%m-%d %H:%M} ({here!r}), and the later file "
                "replaces the earlier at the destination; put the date in it (%Y-%m-%d)"
            )
    return None


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)


def _split_key(text: str) -> tuple[str, ...]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)
    return tuple(p.strip("\"'") for p in parts)


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each table and key path to the line it is written on (first occurrence)."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        if m := _HEADER.match(line):
            table = _split_key(m.group(1))
            lines.setdefault(table, number)
        elif m := _KEY.match(line):
            lines.setdefault(table + _split_key(m.group(1)), number)
    return lines
