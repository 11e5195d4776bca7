"""The operators' commands (DESIGN.md §3): `status`, `pause`, `resume`, `config set`,
`archive`.

Each talks to the running daemon on its admin listener (`client.py`); `config set` and
`pause`/`resume` edit the config file first (`edit.py`), then ask for a reload;
`archive` works on disk when the daemon is stopped (archive/offline.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp

from firehosed import config, replay
from firehosed.admin import client, edit, view
from firehosed.archive import offline
from firehosed.errors import ConfigError

_COLOURS = {view.Level.OK: "\033[32m", view.Level.WARN: "\033[33m", view.Level.BAD: "\033[31m"}
_RESET = "\033[0m"


def status(cfg: config.Config, *, as_json: bool) -> int:
    """Print the running daemon's status: a table, or its JSON document."""
    try:
        document = asyncio.run(_get_status(cfg))
    except (aiohttp.ClientError, OSError) as exc:
        where = cfg.admin.listen
        print(f"firehosed: the daemon is not answering on {where}: {exc}", file=sys.stderr)
        return 1
    if "firehoses" not in document:
        print(f"firehosed: {document.get('error', document)}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(document, indent=2))
    else:
        print(table(document, time.time(), colour=sys.stdout.isatty()))
    return 0


async def _get_status(cfg: config.Config) -> dict[str, Any]:
    async with client.connect(cfg) as admin, admin.session.get(admin.url("/v1/status")) as r:
        document: dict[str, Any] = await r.json()
        return document


HEADER = ("FIREHOSE", "CHANNEL", "STATE", "QUEUED", "BYTES", "OLDEST", "LAST DELIVERY")


def table(document: dict[str, Any], now: float, *, colour: bool) -> str:
    """The status document as a table, one row per firehose, last errors beneath."""
    rows, states, errors, archives = [], [], [], []
    for name, fh in document["firehoses"].items():
        text, level = view.state(fh, now)
        states.append((text, level))
        rows.append(
            (
                name,
                fh["channel"],
                text,
                str(fh["queued_records"]),
                view.size(fh["queued_bytes"]),
                view.age(fh["oldest_queued_age_seconds"]) if fh["queued_records"] else "-",
                view.ago(fh["last_delivery"], now),
            )
        )
        if (days := view.archive(fh)) is not None:
            archives.append(f"  {name}: {days}")
        if fh["last_error"]:
            error = fh["last_error"]
            errors.append(f"  {name} ({view.ago(error, now)}): {error['error']}")
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)).rstrip()]
    for row, (_, level) in zip(rows, states, strict=True):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        if colour:
            cells[2] = f"{_COLOURS[level]}{cells[2]}{_RESET}"
        lines.append("  ".join(cells).rstrip())
    storage = view.size(document["storage_bytes"])
    lines.append(f"\naccepting: {'yes' if document['accepting'] else 'no'}, storage: {storage}")
    if cluster := document.get("cluster"):
        lines.append(cluster_line(cluster))
    if archives:
        lines += ["daily archives:", *archives]
    if tasks := document.get("imports"):
        lines += ["imports:", *(f"  {line}" for line in tasks_table(tasks).splitlines())]
    if errors:
        lines += ["last errors:", *errors]
    return "\n".join(lines)


def cluster_line(cluster: dict[str, Any]) -> str:
    """With the JetStream backend: what this process owns in the deployment."""
    me = cluster["process"]
    partitions = sum(1 for owner in cluster["partitions"].values() if owner == me)
    cuts = ", ".join(k for k, v in sorted(cluster["cutters"].items()) if v == me) or "-"
    return (
        f"cluster: {len(cluster['members'])} processes; this one ({me}) owns {partitions}"
        f" of {len(cluster['partitions'])} partitions and cuts {cuts}"
    )


def pause(path: str, name: str, paused: bool) -> int:
    """`firehosed pause|resume NAME`: set `firehoses.NAME.paused`, or an import task's
    `imports.NAME.status` (paused or launched), then reload."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"{path}:1: cannot read config: {exc}", file=sys.stderr)
        return 2
    if name in edit.table_names(text, "firehoses"):
        return set_key(path, ["firehoses", name, "paused"], paused)
    if name in edit.table_names(text, "imports"):
        return set_key(path, ["imports", name, "status"], "paused" if paused else "launched")
    known = ", ".join(
        sorted(edit.table_names(text, "firehoses") | edit.table_names(text, "imports"))
    )
    print(
        f"{path}: no [firehoses.{name}] or [imports.{name}] in the file (known: {known or 'none'})",
        file=sys.stderr,
    )
    return 2


def config_set(path: str, key: str, value: str) -> int:
    """`firehosed config set KEY VALUE`: VALUE is read as TOML, else as a string."""
    try:
        parts = edit.split_key(key)
    except edit.EditError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    return set_key(path, parts, edit.parse_value(value))


def set_key(path: str, key: list[str], value: Any) -> int:
    """Edit, validate, replace the file; then ask the running daemon to reload."""
    try:
        new = edit.set_key(Path(path), key, value)
    except (edit.EditError, ConfigError) as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{path}:1: cannot edit config: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: {'.'.join(key)} = {json.dumps(value)}")
    return asyncio.run(_reload(new))


async def _reload(cfg: config.Config) -> int:
    try:
        async with client.connect(cfg) as admin, admin.session.post(admin.url("/v1/reload")) as r:
            answer = await r.json(content_type=None)
    except (aiohttp.ClientConnectionError, OSError):
        print(f"the daemon is not running ({cfg.admin.listen}): the change applies at its start")
        return 0
    if r.status == 200:
        print("the running daemon reloaded its config")
        return 0
    problems = answer.get("errors") or [answer.get("error", f"HTTP {r.status}")]
    print("the running daemon did not reload:", *problems, sep="\n  ", file=sys.stderr)
    return 1


def tail(cfg: config.Config, firehose: str | None) -> int:
    """`firehosed tail`: print the running daemon's live events, one line each, until
    Ctrl-C (a clean exit, status 0) or the daemon stops."""
    try:
        return asyncio.run(_tail(cfg, firehose))
    except KeyboardInterrupt:
        return 0
    except (aiohttp.ClientError, OSError) as exc:
        where = cfg.admin.listen
        print(f"firehosed: the daemon is not answering on {where}: {exc}", file=sys.stderr)
        return 1


async def _tail(cfg: config.Config, firehose: str | None) -> int:
    params = {"firehose": firehose} if firehose else {}
    async with (
        client.connect(cfg, seconds=None) as admin,
        admin.session.get(admin.url("/v1/tail"), params=params) as response,
    ):
        if response.status != 200:
            print(
                f"firehosed: tail: HTTP {response.status} {await response.text()}", file=sys.stderr
            )
            return 1
        print(f"following {cfg.admin.listen} (Ctrl-C to stop)", flush=True)
        async for line in response.content:
            if line.startswith(b"data: "):
                print(event_line(json.loads(line[6:])), flush=True)
    print("the daemon closed the stream", file=sys.stderr)
    return 0


def event_line(event: dict[str, Any]) -> str:
    """One tail event as a line a person reads."""
    at = time.strftime("%H:%M:%S", time.gmtime(event.get("time", time.time())))
    kind = event.get("event")
    if kind == "accepted":
        to = ",".join(event["firehoses"]) or "(no firehose)"
        return f"{at} accepted  {event['account']} {event['type']} {event['id']} -> {to}"
    if kind == "delivered":
        what = f"{event['records']} records, {view.size(event['bytes'])}"
        return f"{at} delivered {event['firehose']} {event['batch']} ({what})"
    if kind == "dropped":
        return f"{at} dropped   {event['dropped']} events: this reader fell behind"
    return f"{at} {json.dumps(event)}"


def imports(cfg: config.Config, run: str | None, *, as_json: bool) -> int:
    """`firehosed imports [--run ID]`: import tasks and their recent runs, or one run
    with its first errored rows; a run in flight is followed with a progress bar on a
    terminal."""
    try:
        if run is None:
            document = asyncio.run(_get_status(cfg))
            if "imports" not in document:
                print(f"firehosed: {document.get('error', document)}", file=sys.stderr)
                return 1
            text = (
                json.dumps(document["imports"], indent=2)
                if as_json
                else tasks_table(document["imports"])
            )
            print(text)
            return 0
        return asyncio.run(_show_run(cfg, run, as_json=as_json, follow=sys.stdout.isatty()))
    except (aiohttp.ClientError, OSError) as exc:
        print(
            f"firehosed: the daemon is not answering on {cfg.admin.listen}: {exc}", file=sys.stderr
        )
        return 1


async def _show_run(cfg: config.Config, run: str, *, as_json: bool, follow: bool) -> int:
    async with client.connect(cfg, seconds=None) as admin:
        while True:
            async with admin.session.get(admin.url(f"/v1/imports/{run}")) as response:
                document = await response.json()
            if response.status != 200:
                print(f"firehosed: {document.get('error', document)}", file=sys.stderr)
                return 1
            running = document["processing"]["status"] in ("waiting", "processing") and (
                document["fetch"]["status"] != "failed"
            )
            if not (follow and running and not as_json):
                break
            print(f"\r{progress_line(document)}", end="", flush=True)
            await asyncio.sleep(0.5)
    if follow and not as_json:
        print("\r", end="")
    print(json.dumps(document, indent=2) if as_json else run_text(document))
    return 0


def tasks_table(tasks: dict[str, Any]) -> str:
    """Import tasks, one line each, with their recent runs beneath."""
    if not tasks:
        return "no import tasks"
    lines = []
    for name, task in tasks.items():
        source = task["source"] or "(uploads)"
        when = f"next {task['next_run']}" if task["next_run"] else ""
        lines.append(f"{name}  {task['account']}  {source}  {task['status']}  {when}".rstrip())
        for run in task["runs"]:
            lines.append(f"  {run_line(run)}")
    return "\n".join(lines)


def run_line(run: dict[str, Any]) -> str:
    """One run in a line: id, trigger, fetch and processing statuses, counts."""
    fetch, processing = run["fetch"], run["processing"]
    counts = f"{processing['rows']:,} rows, {processing['imported']:,} imported"
    counts += f", {processing['errored']:,} errored"
    error = processing.get("error") or fetch.get("error")
    tail = f": {error}" if error else ""
    return (
        f"{run['run']}  {run['trigger']}  fetch {fetch['status']}  "
        f"processing {processing['status']}  ({counts}){tail}"
    )


def progress_line(run: dict[str, Any]) -> str:
    """A run in flight as a progress bar over its files, with the rows read so far."""
    files = run["files"]
    done = sum(1 for f in files if f["done"])
    width = 30
    filled = width * done // max(1, len(files))
    bar = "#" * filled + "-" * (width - filled)
    rows = run["processing"]["rows"]
    return f"[{bar}] {done}/{len(files)} files, {rows:,} rows, {run['processing']['status']}"


def run_text(run: dict[str, Any]) -> str:
    """A run and its first errored rows, for a person."""
    lines = [run_line(run)]
    for file in run["files"]:
        error = f"  FAILED: {file['error']}" if file["error"] else ""
        lines.append(
            f"  file {file['name']} ({view.size(file['bytes'])}, {file['rows']:,} rows){error}"
        )
    errors = run.get("errors") or []
    if errors:
        lines.append("errored rows (first 100):")
        lines += [
            f"  {e['file']} row {e['row']} {e['column'] or '-'}: {e['reason']}" for e in errors
        ]
    return "\n".join(lines)


def archive(cfg: config.Config, firehose: str, day: str, *, force: bool) -> int:
    """Build and deliver one day of an archive firehose now, printing each step: through
    the running daemon, or on disk when it is stopped (archive/offline.py)."""
    try:
        when = date.fromisoformat(day)
    except ValueError:
        print(
            f"archive {firehose}: --day must be a date, YYYY-MM-DD (got {day!r})", file=sys.stderr
        )
        return 2
    with replay.storage_lock(Path(cfg.storage.dir)) as free:
        if free:
            print(f"archive {firehose} {day}: the daemon is not running: building on disk")
            return asyncio.run(
                _print_steps(firehose, day, offline.archive_day(cfg, firehose, when, force=force))
            )
    try:
        return asyncio.run(_archive(cfg, firehose, day, force=force))
    except (aiohttp.ClientError, OSError) as exc:
        print(
            f"archive {firehose}: the daemon holds the storage lock, but its admin listener "
            f"({cfg.admin.listen}) does not answer: {exc or type(exc).__name__}",
            file=sys.stderr,
        )
        return 1


async def _archive(cfg: config.Config, firehose: str, day: str, *, force: bool) -> int:
    query = {"day": day, **({"force": "1"} if force else {})}
    async with client.connect(cfg, seconds=None) as admin:
        url = admin.url(f"/v1/firehoses/{firehose}/archive")
        async with admin.session.post(url, params=query) as response:
            if response.status != 200:
                error = (await response.json()).get("error", response.reason)
                print(f"archive {firehose}: {error}", file=sys.stderr)
                return 1
            steps = (json.loads(line) async for line in response.content if line.strip())
            return await _print_steps(firehose, day, steps)


async def _print_steps(firehose: str, day: str, steps: AsyncIterator[dict[str, Any]]) -> int:
    async for step in steps:
        if "error" in step:
            print(f"archive {firehose} {day}: FAILED: {step['error']}", file=sys.stderr)
            return 1
        print(f"archive {firehose} {day}: {archive_step(step)}", flush=True)
    return 0


def archive_step(step: dict[str, Any]) -> str:
    """One progress line of `firehosed archive`."""
    if step["step"] == "delivering":
        return f"delivering {step['name']} ({step['records']:,} records, {step['bytes']:,} bytes)"
    if step["step"] == "delivered":
        return f"delivered {step['name']}"
    return f"{step['step']}..."
