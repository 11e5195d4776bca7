"""The command line (DESIGN.md §3): `run`, `check`, `replay`, and the operators'
commands `status`, `pause`, `resume`, `config set` (their bodies in `admin/commands.py`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import structlog
import uvloop

from firehosed import __version__, config, daemon, log, replay
from firehosed.admin import client as admin_client
from firehosed.admin import commands
from firehosed.channels import open_channel
from firehosed.errors import ConfigError, DeliveryError, FirehosedError
from firehosed.imports import pattern as import_pattern
from firehosed.jetstream.cluster import Cluster, ClusterError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `firehosed` console script and `python -m firehosed`."""
    args = _parser().parse_args(argv)
    # These edit the file, which may not be valid yet (a fix is an edit too).
    if args.command in ("pause", "resume"):
        return commands.pause(args.config, args.firehose, paused=args.command == "pause")
    if args.command == "config":
        return commands.config_set(args.config, args.key, args.value)
    try:
        cfg = config.load(args.config)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    if args.command == "check":
        return _check(cfg, connect=args.connect)
    if args.command == "replay":
        return _replay(cfg, args.firehose)
    if args.command == "status":
        return commands.status(cfg, as_json=args.json)
    if args.command == "tail":
        return commands.tail(cfg, args.firehose)
    if args.command == "imports":
        return commands.imports(cfg, args.run, as_json=args.json)
    if args.command == "archive":
        return commands.archive(cfg, args.firehose, args.day, force=args.force)
    return _run(cfg, args.log_level)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firehosed", description="Signal firehose daemon")
    parser.add_argument("--version", action="version", version=f"firehosed {__version__}")
    commands_ = parser.add_subparsers(dest="command", required=True)
    run = commands_.add_parser("run", help="run the daemon")
    check = commands_.add_parser("check", help="validate the config (exit 2 on errors)")
    check.add_argument("--connect", action="store_true", help="also connect to every channel")
    replay_cmd = commands_.add_parser("replay", help="put dead-lettered batches back into delivery")
    replay_cmd.add_argument(
        "--firehose", action="append", help="only this firehose (repeatable; default: all)"
    )
    status = commands_.add_parser("status", help="the running daemon's firehoses, as a table")
    status.add_argument("--json", action="store_true", help="print the /v1/status document")
    tail = commands_.add_parser("tail", help="follow accepted signals and deliveries live")
    tail.add_argument("--firehose", help="only this firehose's signals and deliveries")
    pause = commands_.add_parser(
        "pause", help="stop a firehose's delivery or an import task's runs (paused)"
    )
    resume = commands_.add_parser("resume", help="resume a firehose or an import task")
    for sub in (pause, resume):
        sub.add_argument("firehose", help="the firehose's or import task's name")
    imports_cmd = commands_.add_parser("imports", help="import tasks, their runs, errored rows")
    imports_cmd.add_argument("--run", help="one run, with its first errored rows")
    imports_cmd.add_argument("--json", action="store_true", help="print the JSON document")
    archive = commands_.add_parser(
        "archive", help="build and deliver one day of a daily archive firehose now"
    )
    archive.add_argument("firehose", help="the archive firehose's name")
    archive.add_argument("--day", required=True, help="the day, YYYY-MM-DD, in its timezone")
    archive.add_argument("--force", action="store_true", help="send a day that was delivered again")
    config_cmd = commands_.add_parser("config", help="edit the config file, then reload")
    set_cmd = config_cmd.add_subparsers(dest="action", required=True).add_parser(
        "set", help="set KEY (dotted: firehoses.NAME.paused) to VALUE (TOML, else a string)"
    )
    set_cmd.add_argument("key")
    set_cmd.add_argument("value")
    for sub in (run, check, replay_cmd, status, tail, pause, resume, set_cmd, archive, imports_cmd):
        sub.add_argument(
            "-c",
            "--config",
            default=config.default_path(),
            help="config file (default: ./config.toml or $FIREHOSED_CONFIG)",
        )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _run(cfg: config.Config, log_level: str) -> int:
    log.configure(log_level)
    for warning in cfg.warnings:
        structlog.get_logger(__name__).warning("config.warning", problem=warning)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(daemon.run(cfg))
    except FirehosedError as exc:
        print(f"firehosed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"firehosed: cannot start: {exc}", file=sys.stderr)
        return 1


def _check(cfg: config.Config, *, connect: bool) -> int:
    for warning in cfg.warnings:
        print(warning, file=sys.stderr)
    counts = (len(cfg.accounts), len(cfg.channels), len(cfg.all_firehoses()))
    print(f"{cfg.path}: ok ({counts[0]} accounts, {counts[1]} channels, {counts[2]} firehoses)")
    for name, task in sorted(cfg.imports.items()):
        if task.pattern is not None:
            print(f"imports.{name}.pattern: {_pattern_reading(task)}")
    if not connect:
        return 0
    return asyncio.run(_connect_all(cfg))


def _pattern_reading(task: config.ImportConfig) -> str:
    """How a task's pattern is read, and what it selects for the day a run started now
    would take: the spelling is guessed from the pattern's characters, so say it."""
    assert task.pattern is not None
    offset = timedelta(days=config.import_offset(task.offset) or 0)
    day = datetime.now(ZoneInfo(task.timezone)).date() + offset
    expanded = import_pattern.expand(task.pattern, day)
    return f"read as {import_pattern.style(task.pattern)}: on {day} it selects {expanded}"


async def _connect_all(cfg: config.Config) -> int:
    failed = 0
    if cfg.storage.backend == "jetstream":
        failed += await _connect_cluster(cfg)
    for name, channel_config in cfg.channels.items():
        channel = open_channel(name, channel_config)
        try:
            print(f"channel {name}: ok: {await channel.check()}")
        except DeliveryError as exc:
            failed += 1
            print(f"channel {name}: FAILED: {exc}")
        finally:
            await channel.close()
    return 1 if failed else 0


async def _connect_cluster(cfg: config.Config) -> int:
    """Reach the JetStream cluster, set up or check its streams: 0 if it can be used."""
    cluster = Cluster(cfg.jetstream, me="check")
    try:
        await cluster.connect()
        print(f"jetstream: ok: {await cluster.describe()}")
        return 0
    except ClusterError as exc:
        print(f"jetstream: FAILED: {exc}")
        return 1
    finally:
        await cluster.close()


def _replay(cfg: config.Config, only: list[str] | None) -> int:
    if cfg.storage.backend == "jetstream":
        return _replay_jetstream(cfg, only)
    names = replay.dead_firehoses(cfg, only)
    if not names:
        print("nothing to replay: no dead-lettered batches")
        return 0
    with replay.storage_lock(Path(cfg.storage.dir)) as free:
        if free:
            for name in names:
                _report(name, (replay.progress(m) for m in replay.replay_offline(cfg, name)))
            print("the daemon is not running: the batches are delivered at its next start")
            return 0
    return asyncio.run(_replay_online(cfg, names))


def _replay_jetstream(cfg: config.Config, only: list[str] | None) -> int:
    """The dead letters are in the cluster, and each firehose's cutter replays its own:
    ask the process running here, for every firehose (or those asked for)."""
    with replay.storage_lock(Path(cfg.storage.dir)) as free:
        if free:
            print(
                "replay: the daemon is not running here; in a JetStream deployment a running"
                " process replays (the one that cuts the firehose)",
                file=sys.stderr,
            )
            return 1
    return asyncio.run(_replay_online(cfg, [n for n in cfg.firehoses if not only or n in only]))


async def _replay_online(cfg: config.Config, names: list[str]) -> int:
    """Ask the running daemon, on its admin listener, to replay each firehose; 1 when
    one of them could not be."""
    failed = False
    async with admin_client.connect(cfg, seconds=None) as admin:
        for name in names:
            async with admin.session.post(admin.url(f"/v1/firehoses/{name}/replay")) as response:
                if response.status != 200:
                    print(f"replay {name}: FAILED: {response.status} {await response.text()}")
                    failed = True
                    continue
                lines = [
                    msgspec.json.decode(line) async for line in response.content if line.strip()
                ]
                failed = _report(name, lines) is not None or failed
    return 1 if failed else 0


def _report(firehose: str, lines: Iterable[dict[str, Any]]) -> str | None:
    """Print a replay's progress; the error that stopped it, if one did."""
    count, error = 0, None
    for line in lines:
        if "error" in line:
            error = line["error"]
            break
        count += 1
        size = f"{line['records']} records, {line['bytes']} bytes"
        print(f"replay {firehose}: {line['batch']} ({size})")
    print(f"replay {firehose}: {count} batches back in delivery")
    if error is not None:
        print(f"replay {firehose}: FAILED: {error}", file=sys.stderr)
    return error
