"""An import run on disk: what it takes, how far it got, what went wrong.

Layout, under `storage.dir/imports/<task>/`:

    ledger.ndjson          files taken by a run: name, size, version (one line each)
    state.json             the task's last schedule slot and whether it is completed
    runs/<run id>/run.json the run (`Run`), rewritten durably at every step
    runs/<run id>/data/<n> its files' bytes (fetched or uploaded), until processed
    runs/<run id>/errors.csv  its errored rows: file, row, column, reason

A run's `run.json` is written before anything it describes is acted on, so a crash at
any point resumes the run from it: a file not yet fetched is fetched again, a file being
processed goes on after the last chunk of rows that was durable (the rows of the chunk
in flight are sent again and dropped by dedupe, their ids being stable).
"""

from __future__ import annotations

import csv
import io
import os
import secrets
import shutil
import time
from collections.abc import Iterable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import msgspec

from firehosed.faults import fail_point
from firehosed.fileio import fsync_dir, make_dirs, write_durably

KEEP_RUNS = 100  # finished runs kept per task (their run.json and errors.csv)
LATEST = 5  # runs per task that status shows (kept in memory)
LISTED_ERRORS = 100  # errored rows a run's status lists
ERRORS_READ = 1 << 20  # bytes of errors.csv read to list them


class File(msgspec.Struct, kw_only=True):
    """One file of a run."""

    name: str  # in the source (pulled) or the upload's name
    size: int
    version: str
    data: str  # its bytes, in the run's data/ directory
    gzip: bool = False
    fetched: bool = False
    rows_done: int = 0  # data rows read and settled (imported, duplicate or errored)
    done: bool = False
    error: str | None = None  # why the file could not be read (the run failed)


class Fetch(msgspec.Struct, kw_only=True):
    status: Literal["fetching", "fetched", "failed"] = "fetching"
    started: float
    ended: float | None = None
    error: str | None = None


class Processing(msgspec.Struct, kw_only=True):
    status: Literal["waiting", "processing", "processed", "failed"] = "waiting"
    started: float | None = None
    ended: float | None = None
    rows: int = 0
    imported: int = 0
    duplicates: int = 0
    errored: int = 0
    error: str | None = None


class Run(msgspec.Struct, kw_only=True):
    """One execution of a task: a scheduled pull, or an upload."""

    id: str
    task: str
    account: str
    trigger: Literal["schedule", "missed", "once", "upload"]
    slot: float | None = None  # the schedule slot it ran for (epoch)
    day: date | None = None  # the day its pattern was expanded for
    format: str
    files: list[File] = msgspec.field(default_factory=list)
    fetch: Fetch
    processing: Processing = msgspec.field(default_factory=Processing)
    errors_size: int = 0  # bytes of errors.csv that are settled

    @property
    def finished(self) -> bool:
        return self.fetch.status == "failed" or self.processing.status in ("processed", "failed")

    def document(self, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The run as `GET /v1/accounts/{account}/imports/{run}` answers it."""
        fetch, processing = self.fetch, self.processing
        body: dict[str, Any] = {
            "run": self.id,
            "task": self.task,
            "trigger": self.trigger,
            "day": self.day.isoformat() if self.day else None,
            "files": [
                {
                    "name": f.name,
                    "bytes": f.size,
                    "rows": f.rows_done,
                    "done": f.done,
                    "error": f.error,
                }
                for f in self.files
            ],
            "fetch": {
                "status": fetch.status,
                "started": _iso(fetch.started),
                "ended": _iso(fetch.ended),
                **({"error": fetch.error} if fetch.error else {}),
            },
            "processing": {
                "status": processing.status,
                "started": _iso(processing.started),
                "ended": _iso(processing.ended),
                "rows": processing.rows,
                "imported": processing.imported,
                "duplicates": processing.duplicates,
                "errored": processing.errored,
                **({"error": processing.error} if processing.error else {}),
            },
        }
        if errors is not None:
            body["errors"] = errors
        return body


class Progress(NamedTuple):
    """A save of a run's progress, taken (`TaskStore.progress`) and not yet written."""

    run: str  # its id
    errors_at: int  # where in errors.csv its errored rows go
    errors: bytes  # those rows, as CSV
    document: bytes  # run.json


class TaskState(msgspec.Struct, kw_only=True):
    last_slot: float | None = None
    completed: bool = False


class Ledger:
    """The files a task's runs have taken, by (name, size, version): a file changed
    since is taken again, an unchanged one never."""

    def __init__(self, path: Path, sync: bool) -> None:
        self.path = path
        self.sync = sync
        self._taken: set[tuple[str, int, str]] = set()
        if path.exists():
            for line in path.read_bytes().splitlines():
                try:
                    entry = msgspec.json.decode(line)
                except msgspec.DecodeError:
                    continue  # a line torn by a crash: its run takes the file again
                self._taken.add((entry["name"], entry["size"], entry["version"]))

    def __contains__(self, key: tuple[str, int, str]) -> bool:
        return key in self._taken

    def add(self, files: Iterable[File], run: str) -> None:
        """Note `files` as taken by `run` (durably, before the run's 'fetched')."""
        lines = b"".join(
            msgspec.json.encode({"name": f.name, "size": f.size, "version": f.version, "run": run})
            + b"\n"
            for f in files
            if (f.name, f.size, f.version) not in self._taken
        )
        if not lines:
            return
        new = not self.path.exists()
        with open(self.path, "ab") as out:
            out.write(lines)
            if self.sync:
                out.flush()
                os.fsync(out.fileno())
        if new and self.sync:
            fsync_dir(self.path.parent)
        self._taken.update((f.name, f.size, f.version) for f in files)


class TaskStore:
    """One task's directory: its state, ledger and runs."""

    def __init__(self, root: Path, sync: bool) -> None:
        self.root = root
        self.sync = sync
        make_dirs(root / "runs", sync)
        self.ledger = Ledger(root / "ledger.ndjson", sync)
        state = root / "state.json"
        self.state = (
            msgspec.json.decode(state.read_bytes(), type=TaskState)
            if state.exists()
            else TaskState()
        )
        # The newest LATEST runs by id, as last saved: what status shows, read on the
        # event loop without touching the disk. Replaced whole on each save (a worker
        # thread saves; the loop reads), never changed in place.
        self.latest: dict[str, Run] = {run.id: run for run in self.runs()[-LATEST:]}
        # Bytes of a run's errors.csv written by this process: its errors_size runs ahead
        # while a save is being written, and `errors` reads no further than this.
        self._errors_written: dict[str, int] = {}

    def save_state(self) -> None:
        write_durably(self.root / "state.json", msgspec.json.encode(self.state), self.sync)

    def new_run(self, **fields: Any) -> Run:
        """A new run with a fresh id and its directory (not yet saved)."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        run = Run(id=f"{stamp}-{secrets.token_hex(4)}", **fields)
        make_dirs(self.run_dir(run.id) / "data", self.sync)
        return run

    def run_dir(self, run: str) -> Path:
        return self.root / "runs" / run

    def save(self, run: Run) -> None:
        fail_point("import.run_save")
        write_durably(self.run_dir(run.id) / "run.json", msgspec.json.encode(run), self.sync)
        self._note(run)

    def _note(self, run: Run) -> None:
        latest = {**self.latest, run.id: run}
        self.latest = {k: latest[k] for k in sorted(latest)[-LATEST:]}

    def load(self, run: str) -> Run | None:
        """Run `run` from disk, or None (no such run; an id is never a path)."""
        if not run or "/" in run or run.startswith("."):
            return None
        path = self.run_dir(run) / "run.json"
        return msgspec.json.decode(path.read_bytes(), type=Run) if path.exists() else None

    def drop_run(self, run: Run) -> None:
        """Forget a run that never started (an upload that did not arrive whole)."""
        shutil.rmtree(self.run_dir(run.id), ignore_errors=True)
        self.latest = {k: v for k, v in self.latest.items() if k != run.id}

    def runs(self) -> list[Run]:
        """Every run on disk, oldest first."""
        found = []
        for directory in sorted((self.root / "runs").iterdir()):
            path = directory / "run.json"
            if path.exists():
                found.append(msgspec.json.decode(path.read_bytes(), type=Run))
        return found

    def unfinished(self) -> dict[tuple[str, int, str], int]:
        """The rows settled of each file version (name, size, version) that a run read
        in part as it arrived and never finished (its fetch failed): a later run that
        takes the same version reads on after them, its rows' ids being the same."""
        settled: dict[tuple[str, int, str], int] = {}
        for run in self.runs():
            if run.fetch.status != "failed":
                continue
            for f in run.files:
                if f.rows_done and not f.done:
                    key = (f.name, f.size, f.version)
                    settled[key] = max(settled.get(key, 0), f.rows_done)
        return settled

    def data(self, run: Run, file: File) -> Path:
        return self.run_dir(run.id) / "data" / file.data

    def progress(self, run: Run, rows: list[tuple[str, int, str, str]]) -> Progress:
        """What saving `run` now, with its errored `rows` (file, row, column, reason) met
        since the last save, writes (`write_progress`). Taken on the event loop, so that
        the run's figures and its errors file agree however the run goes on while the
        save is written; the run's errors_size moves past the rows."""
        data = b""
        if rows:
            text = io.StringIO(newline="")
            writer = csv.writer(text, lineterminator="\r\n")
            if run.errors_size == 0:
                writer.writerow(["file", "row", "column", "reason"])
            writer.writerows(rows)
            data = text.getvalue().encode()
        at = run.errors_size
        run.errors_size += len(data)
        self._note(run)
        return Progress(run.id, at, data, msgspec.json.encode(run))

    def write_progress(self, progress: Progress) -> None:
        """Append the errored rows to the run's errors.csv (cut first to where they go: a
        resumed run cuts what a crash left past its last save), then save the run."""
        fail_point("import.save")
        directory = self.run_dir(progress.run)
        if progress.errors:
            path = directory / "errors.csv"
            with open(path, "ab" if path.exists() else "wb") as out:
                out.truncate(progress.errors_at)
                out.seek(progress.errors_at)
                out.write(progress.errors)
                if self.sync:
                    out.flush()
                    os.fsync(out.fileno())
            self._errors_written[progress.run] = progress.errors_at + len(progress.errors)
        write_durably(directory / "run.json", progress.document, self.sync)

    def saves_ended(self, run: Run) -> None:
        """No save of `run` is being written now: its errors.csv is read as far as its
        errors_size says again (and this store holds nothing more for it)."""
        self._errors_written.pop(run.id, None)

    def errors(self, run: Run, limit: int = LISTED_ERRORS) -> list[dict[str, Any]]:
        """The first `limit` errored rows of `run`."""
        path = self.run_dir(run.id) / "errors.csv"
        if not path.exists():
            return []
        written = self._errors_written.get(run.id, run.errors_size)
        with path.open("rb") as f:  # 100 rows of short reasons: far less than this
            head = f.read(min(written, ERRORS_READ)).decode("utf-8", "replace")
        reader = csv.reader(io.StringIO(head, newline=""))
        next(reader, None)
        out: list[dict[str, Any]] = []
        for cells in reader:
            if len(cells) != 4 or len(out) == limit:
                break  # (the last row read may be cut at ERRORS_READ)
            file, row, column, reason = cells
            out.append({"file": file, "row": int(row), "column": column, "reason": reason})
        return out

    def drop_data(self, run: Run) -> None:
        """A finished run's files are not needed any more: free their disk."""
        shutil.rmtree(self.run_dir(run.id) / "data", ignore_errors=True)

    def prune(self) -> None:
        """Keep the newest KEEP_RUNS finished runs."""
        finished = [r for r in self.runs() if r.finished]
        for run in finished[:-KEEP_RUNS]:
            shutil.rmtree(self.run_dir(run.id), ignore_errors=True)


def now() -> float:
    return time.time()


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
