"""Import tasks: scheduled pulls and uploads, fed through the receiver like POSTs.

Each `[imports.NAME]` task with a source has a loop that waits for its cron `schedule`
(in its `timezone`) and starts a run: list the source's files matching the pattern of
the run's day (the slot's day plus `offset`) that the task's ledger does not hold, fetch
each to local disk (durably), then process them. A slot missed while the daemon was
down runs once on start, for the latest missed slot only. An upload is a run whose file
arrived over HTTP (ingest/app.py) and is durable before its 202.

Processing reads a file's rows CHUNK at a time and turns each valid row into a signal
(rows.py): a large file in a process of its own, on another core (reader.py), a small
one in a worker thread. It hands each chunk to the same `Receiver.accept` as an
HTTP request: dedupe, catch-up, routing, durable before counted. A chunk the receiver
cannot keep now (503: disk budget, shutting down) is offered again after a pause, never
dropped. The run's progress is saved after each chunk (runs.py), so a crash resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from cronsim import CronSim

from firehosed import metrics
from firehosed.channels.base import Channel, RemoteFile, sync_file
from firehosed.config import Config, ImportConfig, import_offset
from firehosed.envelope import Envelopes
from firehosed.errors import DeliveryError, SourceChanged
from firehosed.faults import fail_point
from firehosed.fileio import Paced, fsync_dir
from firehosed.imports import pattern as patterns
from firehosed.imports.arriving import Abandoned, Arrival
from firehosed.imports.child import Chunk, Job
from firehosed.imports.reader import PROCESS_FROM, Reader
from firehosed.imports.rows import FileError
from firehosed.imports.runs import Fetch, File, Ledger, Run, TaskStore, now
from firehosed.ingest.receiver import Answer, IngestAccount, Receiver
from firehosed.tasks import raise_if_cancelled

log = structlog.get_logger(__name__)

CHUNK = 2000  # rows read at a time (in a child process or a worker thread)
RATE_STEPS = 50  # bursts a second of a task with rows_per_second
IN_FLIGHT = 4  # chunks being committed at once (each is saved once it is kept)
PIECE = 500  # rows per Receiver.accept (<= MAX_REJECTED_LISTED); a chunk's go together
# Pieces being committed at once, of all runs: a POST's group commit shares its round,
# and waits for the round before it, with at most this many pieces of import rows. With
# every piece in flight at once (16), a POST's p99 during the 1M-row bench was 27-31 ms
# and its slowest 40-117 ms; with 2, 20-23 ms and 23-29 ms, at the same rows/s.
COMMITTING = 2
# Seconds between saves of a run's progress: 0, every chunk. A resumed run sends again
# the rows after its last save; those still in a queue are duplicates (dedupe takes the
# queues' recent records at start), those already delivered would arrive twice: so the
# save follows each chunk's 202 at once, before a batch holding its rows can be cut.
SAVE_EVERY = 0.0
WAKE = 5.0  # seconds: a waiting task looks at the wall clock at least this often
MISSED_LOOKBACK = 7 * 86400  # seconds: how far back a restart looks for a missed slot
FETCH_ATTEMPTS = 3
REMOVED = "removed at the source after it was listed"  # a file's error: never taken
RETRY_FIRST, RETRY_MAX = 1.0, 30.0  # seconds: pauses while the receiver refuses


class UploadError(Exception):
    """An upload that cannot be taken: the HTTP status and message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Importer:
    """Every import task of the running config, its schedule loop and its runs."""

    def __init__(self, root: Path, receiver: Receiver, sync: bool) -> None:
        self.root = root
        self.receiver = receiver
        self.sync = sync
        self.tasks: dict[str, ImportConfig] = {}
        self.stores: dict[str, TaskStore] = {}
        self.channels: dict[str, Channel] = {}
        self.fields: dict[str, Any] = {}  # account: FieldsConfig
        self.processes = 1  # files read in child processes at once, at most
        self._children = 0  # files being read in child processes
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._active: dict[str, asyncio.Task[None]] = {}  # run id: its processing
        self._live: dict[str, Run] = {}  # run id: the run in memory while it runs
        self._committing = asyncio.Semaphore(COMMITTING)

    # -- config ---------------------------------------------------------------------

    async def configure(self, config: Config, channels: dict[str, Channel]) -> None:
        """Apply a (re)loaded config: a task whose settings changed restarts its loop
        (its runs in flight go on); a task gone stops scheduling."""
        old = self.tasks
        self.tasks = dict(config.imports)
        self.channels = channels
        self.fields = {name: account.fields for name, account in config.accounts.items()}
        self.processes = config.server.import_processes
        for name in list(self._loops):
            if self.tasks.get(name) != old.get(name):
                await self._cancel(self._loops.pop(name))
        for name in self.tasks:
            if name not in self.stores:
                root = self.root / name
                self.stores[name] = await asyncio.to_thread(TaskStore, root, self.sync)
            if name not in self._loops:
                self._loops[name] = asyncio.create_task(self._loop(name), name=f"import:{name}")

    async def stop(self) -> None:
        """Stop every loop and run (a run resumes where it was at the next start)."""
        for task in [*self._loops.values(), *self._active.values()]:
            await self._cancel(task)
        self._loops.clear()

    @staticmethod
    async def _cancel(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # -- the schedule -----------------------------------------------------------------

    async def _loop(self, name: str) -> None:
        """Run `_schedule` of task `name`; an error that escapes it (a disk that fails
        the task's state or a new run's first save) is logged as `import.loop_failed`,
        and the loop starts again after a pause (1 s, doubling to 30 s): a task never
        stops being scheduled until a restart."""
        await _until_done(lambda _: self._schedule(name), "import.loop_failed", task=name)

    async def _schedule(self, name: str) -> None:
        """Resume the task's unfinished runs, then run it on its schedule."""
        store = self.stores[name]
        for run in await asyncio.to_thread(store.runs):
            if not run.finished and run.id not in self._active:
                log.info("import.resuming", task=name, run=run.id)
                await self._start(store, run)
        while (slot := await self._next_slot(name)) is not None:
            when, trigger = slot
            await self._pull(name, when, trigger)

    async def _next_slot(self, name: str) -> tuple[float, str] | None:
        """Wait for the task's next run: (its slot, its trigger); None when the task does
        not run on its own (uploads only, draft, paused, completed)."""
        task, store = self.tasks[name], self.stores[name]
        if task.source is None or task.status != "launched" or store.state.completed:
            return None
        if task.once:
            return time.time(), "once"
        assert task.schedule is not None  # checked at load
        zone = ZoneInfo(task.timezone)
        at = time.time()
        if store.state.last_slot is None:  # a new task: from now on, not before
            store.state.last_slot = at
            await asyncio.to_thread(store.save_state)
        while True:
            at = time.time()
            until = at if task.ends is None else min(at, task.ends.timestamp())
            if (due := _latest_slot(task.schedule, zone, store.state.last_slot, until)) is not None:
                return due, "missed" if at - due > 60 else "schedule"
            if task.ends is not None and at >= task.ends.timestamp():
                store.state.completed = True
                await asyncio.to_thread(store.save_state)
                log.info("import.completed", task=name, ends=task.ends.isoformat())
                return None
            after = datetime.fromtimestamp(at, zone)
            upcoming = next(iter(CronSim(task.schedule, after))).timestamp()
            # Sleep in short steps: the wall clock may jump (NTP, a test's faked clock).
            await asyncio.sleep(min(WAKE, max(0.01, upcoming - at)))

    async def _pull(self, name: str, slot: float, trigger: str) -> None:
        """Start a run of task `name` for `slot` and wait for it to end."""
        task, store = self.tasks[name], self.stores[name]
        zone = ZoneInfo(task.timezone)
        day = datetime.fromtimestamp(slot, zone).date() + timedelta(
            days=import_offset(task.offset) or 0
        )
        run = store.new_run(
            task=name,
            account=task.account,
            trigger=trigger,
            slot=slot,
            day=day,
            format=task.format,
            fetch=Fetch(started=now()),
        )
        await asyncio.to_thread(store.save, run)  # the run first: a crash resumes it
        store.state.last_slot = slot
        store.state.completed = task.once
        await asyncio.to_thread(store.save_state)
        log.info("import.run_started", task=name, run=run.id, trigger=trigger, day=str(day))
        await self._start(store, run)

    async def _start(self, store: TaskStore, run: Run) -> None:
        """Run `run` to its end (fetch if need be, then process); a cancelled wait
        (a reload restarting the loop) leaves the run going."""
        await asyncio.shield(self._spawn(store, run))

    def _spawn(self, store: TaskStore, run: Run) -> asyncio.Task[None]:
        task = asyncio.create_task(self._carry(store, run), name=f"import-run:{run.id}")
        self._active[run.id] = task
        self._live[run.id] = run

        def ended(_: asyncio.Task[None]) -> None:
            self._active.pop(run.id, None)
            self._live.pop(run.id, None)

        task.add_done_callback(ended)
        return task

    # -- a run ------------------------------------------------------------------------

    async def _carry(self, store: TaskStore, run: Run) -> None:
        """Run `run` to its end. An error that escapes it (a disk that fails a save, a
        bug) is logged as `import.run_failed`, and after a pause (1 s, doubling to 30 s)
        the run resumes from its last save, as it would after a restart: the rows it
        kept since are offered again, and are duplicates."""

        async def attempt(again: bool) -> None:
            nonlocal run
            if again:
                saved = await asyncio.to_thread(store.load, run.id)
                run = self._live[run.id] = saved or run
                log.info("import.resuming", task=run.task, run=run.id)
            await self._execute(store, run)

        await _until_done(attempt, "import.run_failed", task=run.task, run=run.id)

    async def _execute(self, store: TaskStore, run: Run) -> None:
        started = time.monotonic()
        if run.fetch.status == "fetching":
            await self._fetch(store, run)
        if run.fetch.status == "fetched" and not run.finished:
            await self._process(store, run)
        await asyncio.to_thread(store.drop_data, run)
        await asyncio.to_thread(store.prune)
        metrics.import_run_seconds.labels(run.task).observe(time.monotonic() - started)
        if run.processing.status == "processed":
            metrics.import_last_success.labels(run.task).set(time.time())
        log.info(
            "import.run_ended",
            task=run.task,
            run=run.id,
            fetch=run.fetch.status,
            processing=run.processing.status,
            rows=run.processing.rows,
            imported=run.processing.imported,
            errored=run.processing.errored,
        )

    async def _fetch(self, store: TaskStore, run: Run) -> None:
        """List the source (once per run) and copy each new file to local disk. From a
        source that fetches the version it listed (`Channel.streams`), a file's rows are
        processed as it arrives (`_fetch_arriving`), and the next file is fetched once
        they are."""
        task = self.tasks.get(run.task)
        if run.trigger == "upload" or task is None or task.source is None or run.day is None:
            await self._fetch_failed(store, run, "the upload or task is gone")
            return
        channel = self.channels[task.source]
        expanded = patterns.expand(task.pattern or "", run.day)
        changed = False  # a file changed since the listing: list again, take it as it is
        processing: asyncio.Task[None] | None = None  # the rows of the file fetched last
        try:
            for attempt in range(1, FETCH_ATTEMPTS + 1):
                try:
                    if not run.files or changed:
                        listed = await channel.list_files(expanded, account=task.account)
                        if changed:
                            _relisted(run, listed, store.ledger)
                        else:
                            settled = await asyncio.to_thread(store.unfinished)
                            run.files = _new_files(listed, store.ledger, settled)
                        await asyncio.to_thread(store.save, run)
                    processing = await self._fetch_files(
                        store, run, channel, task.account, processing
                    )
                    break
                except DeliveryError as exc:
                    changed = isinstance(exc, SourceChanged)
                    event = "import.source_changed" if changed else "import.fetch_failed"
                    log.warning(event, task=run.task, run=run.id, error=str(exc))
                    if attempt == FETCH_ATTEMPTS:
                        await self._fetch_failed(store, run, str(exc))
                        return
                    # (a file that changed may still be being written: it is given a while)
                    await asyncio.sleep(RETRY_FIRST * 5**attempt)
            # (a file that arrived and failed as it was read is taken: it failed whole)
            taken = [file for file in run.files if file.error != REMOVED]
            await asyncio.to_thread(store.ledger.add, taken, run.id)
            run.fetch.status, run.fetch.ended = "fetched", now()
            if processing is not None:  # (its saves note "fetched": the ledger holds the files)
                await processing
            await asyncio.to_thread(store.save, run)
        finally:
            if processing is not None and not processing.done():  # the daemon stops
                processing.cancel()
                await asyncio.wait([processing])

    async def _fetch_files(
        self,
        store: TaskStore,
        run: Run,
        channel: Channel,
        account: str,
        processing: asyncio.Task[None] | None,
    ) -> asyncio.Task[None] | None:
        """Fetch each file of `run` not yet fetched, in order; the processing of the last
        one where it goes on as it arrived (`processing`: an earlier one's, waited for
        before the next fetch)."""
        for file in run.files:
            if file.fetched or file.done:
                continue
            if processing is not None:
                await processing
            if channel.streams:
                processing = await self._fetch_arriving(store, run, file, channel, account)
            else:
                await self._fetch_file(store, run, file, channel, account)
        return processing

    async def _fetch_failed(self, store: TaskStore, run: Run, error: str) -> None:
        """End `run` with its fetch failed; rows it took from a file that arrived in part
        (kept: a later run of the same version reads on after them) end its processing
        as failed too."""
        run.fetch.status, run.fetch.error, run.fetch.ended = "failed", error, now()
        processing = run.processing
        if processing.status == "processing":
            processing.status, processing.error = "failed", f"its fetch failed: {error}"
            processing.ended = now()
        await asyncio.to_thread(store.save, run)

    async def _fetch_file(
        self,
        store: TaskStore,
        run: Run,
        file: File,
        channel: Channel,
        account: str,
        *,
        save: bool = True,
    ) -> None:
        """Fetch `file` as listed: SourceChanged if the source has another version now.
        Then it is marked fetched, and the run saved unless `save` is False."""
        target = store.data(run, file)
        size = await channel.fetch(file.name, target, account=account, version=file.version)
        if size != file.size:
            raise SourceChanged(
                f"{file.name}: changed since it was listed ({file.size:,} bytes then, "
                f"{size:,} fetched)"
            )
        if self.sync:
            await asyncio.to_thread(fsync_dir, target.parent)
        file.fetched = True
        if save:
            await asyncio.to_thread(store.save, run)

    async def _fetch_arriving(
        self, store: TaskStore, run: Run, file: File, channel: Channel, account: str
    ) -> asyncio.Task[None]:
        """Fetch `file` while its rows are processed as it arrives; that processing,
        which goes on once the file is whole and marked fetched (noted by the next save
        of the run's progress). A fetch that stops short ends the reading after the
        rows of the bytes on disk (kept and saved) and raises its error: fetched again,
        by the next attempt or after a restart, the file is read on after its last
        saved row (the source's version check makes it the same version)."""
        await asyncio.to_thread(_emptied, store.data(run, file))
        await self._processing_begins(store, run)
        arrival = Arrival()
        processing = asyncio.create_task(self._process_file(store, run, file, arrival))
        try:
            await self._fetch_file(store, run, file, channel, account, save=False)
        except BaseException as exc:
            arrival.stop()
            if not isinstance(exc, DeliveryError):  # cancelled (the daemon stops), a bug
                processing.cancel()
            await asyncio.wait([processing])
            if processing.cancelled():
                raise
            if (error := processing.exception()) is not None and not isinstance(error, Abandoned):
                raise error from exc  # (a bug in processing says more than the fetch)
            raise
        return processing

    async def _processing_begins(self, store: TaskStore, run: Run) -> None:
        processing = run.processing
        if processing.status != "processing":
            processing.status = "processing"
            processing.started = processing.started or now()
            await asyncio.to_thread(store.save, run)

    async def _process(self, store: TaskStore, run: Run) -> None:
        """Feed every file's valid rows to the receiver; note the others."""
        await self._processing_begins(store, run)
        for file in run.files:
            if not file.done:
                await self._process_file(store, run, file)
        failed = [f for f in run.files if f.error]
        processing = run.processing
        processing.status = "failed" if failed else "processed"
        if failed:
            processing.error = f"{failed[0].name}: {failed[0].error}"
        processing.ended = now()
        await asyncio.to_thread(store.save, run)

    async def _process_file(
        self, store: TaskStore, run: Run, file: File, arrival: Arrival | None = None
    ) -> None:
        """Feed `file`'s rows to the receiver (read as it arrives, given its `arrival`),
        then mark it done; Abandoned (from its arrival) leaves it to be read on."""
        try:
            await self._rows(store, run, file, arrival)
        except FileError as exc:
            file.error = str(exc)
            log.warning(
                "import.file_failed", task=run.task, run=run.id, file=file.name, error=str(exc)
            )
        file.done = True
        await asyncio.to_thread(store.save, run)

    async def _rows(
        self, store: TaskStore, run: Run, file: File, arrival: Arrival | None = None
    ) -> None:
        """One file's rows, CHUNK at a time, from where the run last got to."""
        task = self.tasks.get(run.task)
        rate = task.rows_per_second if task is not None else None
        # Limited, the rows go in RATE_STEPS small bursts a second: a burst is what a
        # request arriving meanwhile waits behind.
        size = CHUNK if rate is None else max(1, min(CHUNK, rate // RATE_STEPS))
        columns = task.columns if task is not None else {}
        key = f"{file.name}@{file.version}"
        job = Job(
            store.data(run, file),
            run.format,
            file.rows_done,
            size,
            run.task,
            columns,
            self.fields[run.account],
            key,
            None if arrival is None else file.size,
        )
        async with self._reader(job, arrival) as reader:
            await self._feed(store, run, file, reader, rate)

    async def _feed(
        self, store: TaskStore, run: Run, file: File, reader: Reader, rate: int | None
    ) -> None:
        """`reader`'s chunks to the receiver, each as concurrent pieces of PIECE rows:
        they share group commits, and the event loop serves other requests between
        them. IN_FLIGHT chunks are committed at once, so that the next one is accepted
        while the fsyncs of the last one's commit are waited for. A chunk's progress is
        saved once it and every chunk before it were kept (at most every SAVE_EVERY
        seconds, and at the end), by a save written while the rows go on (`_Saves`). A
        file that fails part-way has the chunks before its fault kept, counted and saved
        first. With a `rate` (rows a second), never ahead of it."""
        saves = _Saves(store, run)
        flight = _Flight(run, file, saves)
        started = time.monotonic()
        sent = 0
        # The next chunk is read while this one is accepted: the reading works while the
        # commits' fsyncs are waited for.
        reading = asyncio.ensure_future(reader.next())
        try:
            while True:
                await flight.settle_while(reading)
                try:
                    chunk = await reading
                except Exception:  # the file fails here: the rows before it are kept
                    await flight.settle(0)
                    await saves.done()
                    raise
                if not chunk.ended:
                    reading = asyncio.ensure_future(reader.next())
                flight.add(chunk, asyncio.ensure_future(self._accept_chunk(run, chunk)))
                await flight.settle(0 if chunk.ended else IN_FLIGHT - 1)
                if chunk.ended:
                    await saves.done()
                    return
                sent += len(chunk.signals) + len(chunk.errors)
                if rate is not None:  # ahead of `rows_per_second`: wait until on time
                    await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
        finally:
            left: list[asyncio.Future[Any]] = [reading, *flight.accepting()]
            for future in left:
                if not future.cancel() and not future.cancelled():
                    future.exception()  # retrieved: an error after a failure is not news
            await saves.ended()

    async def _accept_chunk(self, run: Run, chunk: Chunk) -> list[Answer]:
        """The receiver's answers to `chunk`'s signals, PIECE at a time."""
        account = await self._account(run)
        signals = chunk.signals
        return await asyncio.gather(
            *(
                self._accept(account, signals, at, at + PIECE, run)
                for at in range(0, len(signals), PIECE)
            )
        )

    @contextlib.asynccontextmanager
    async def _reader(self, job: Job, arrival: Arrival | None) -> AsyncIterator[Reader]:
        """A reader of `job`'s file: in a child process if it is large and fewer than
        `processes` read in children now, else in a thread."""
        reader = Reader(job, arrival)
        size = job.path.stat().st_size if job.arriving is None else job.arriving
        in_process = self._children < self.processes and size >= PROCESS_FROM
        self._children += in_process
        try:
            if in_process:
                await reader.spawn()
            yield reader
        finally:
            self._children -= in_process
            await reader.close()

    async def _account(self, run: Run) -> IngestAccount:
        """The run's account as the receiver has it (waiting while a reload removed it)."""
        pauses = _pauses()
        while (account := self.receiver.accounts.get(run.account)) is None:
            log.warning("import.account_missing", task=run.task, account=run.account)
            await asyncio.sleep(next(pauses))
        return account

    async def _accept(
        self, account: IngestAccount, signals: Envelopes, start: int, stop: int, run: Run
    ) -> Answer:
        """`Receiver.accept` of `signals` `start` to `stop`, offered again after a pause
        while the receiver refuses (the disk budget, a failed commit): a row is never
        dropped for it."""
        pauses = _pauses()
        while True:
            refusal = self.receiver.refusal(account.name)
            if refusal is None:
                # A copy: what a refused attempt's routing changed is not offered again.
                async with self._committing:
                    answer = await self.receiver.accept(account, signals.copy(start, stop))
                if answer.status != 503:
                    return answer
                refusal = answer.body.get("error", "not kept")
            pause = next(pauses)
            log.warning("import.waiting", task=run.task, run=run.id, reason=refusal, seconds=pause)
            await asyncio.sleep(pause)

    # -- uploads ----------------------------------------------------------------------

    def upload_task(self, account: str, name: str) -> ImportConfig:
        """The task an upload names; UploadError when the account has no such task."""
        task = self.tasks.get(name)
        if task is None or task.account != account:
            raise UploadError(404, f"account {account} has no import task {name!r}")
        if task.status != "launched":
            raise UploadError(409, f"import task {name} is {task.status}: launch it first")
        return task

    async def upload(
        self, name: str, chunks: AsyncIterator[bytes], *, gzip: bool, limit: int
    ) -> Run:
        """Take an upload for task `name`: its bytes durable on disk, then a run that
        processes them (started here). UploadError(413) past `limit` bytes."""
        task, store = self.tasks[name], self.stores[name]
        run = await asyncio.to_thread(
            store.new_run,
            task=name,
            account=task.account,
            trigger="upload",
            format=task.format,
            fetch=Fetch(started=now()),
        )
        file = File(name="upload", size=0, version=run.id, data="0.gz" if gzip else "0", gzip=gzip)
        run.files.append(file)
        target = store.data(run, file)
        try:
            file.size = await _receive(chunks, target, limit, self.sync)
        except BaseException:
            await asyncio.to_thread(store.drop_run, run)
            raise
        file.fetched = True
        run.fetch.status, run.fetch.ended = "fetched", now()
        await asyncio.to_thread(store.save, run)
        log.info("import.uploaded", task=name, run=run.id, bytes=file.size)
        self._spawn(store, run)
        return run

    # -- what operators see -----------------------------------------------------------

    def run_document(self, account: str | None, run_id: str) -> dict[str, Any] | None:
        """A run's statuses, counts and first errored rows; None if `account` (None:
        any) has no such run."""
        for name, store in self.stores.items():
            task = self.tasks.get(name)
            if account is not None and (task is None or task.account != account):
                continue
            run = self._live.get(run_id) or store.load(run_id)
            if run is not None and run.task == name:
                return run.document(store.errors(run))
        return None

    def status(self) -> dict[str, Any]:
        """Per task: its settings in short, its state, next run, and recent runs."""
        out = {}
        for name, task in sorted(self.tasks.items()):
            store = self.stores.get(name)
            if store is None:
                continue
            runs = list(store.latest.values())  # (a run being processed: its live state)
            state = "completed" if store.state.completed else task.status
            out[name] = {
                "account": task.account,
                "source": task.source,
                "schedule": task.schedule,
                "timezone": task.timezone,
                "status": state,
                "next_run": self._next_run(task, store),
                "runs": [r.document() for r in reversed(runs)],
            }
        return out

    @staticmethod
    def _next_run(task: ImportConfig, store: TaskStore) -> str | None:
        if task.schedule is None or task.status != "launched" or store.state.completed:
            return None
        zone = ZoneInfo(task.timezone)
        at = next(iter(CronSim(task.schedule, datetime.now(zone))))
        if task.ends is not None and at > task.ends:
            return None
        return at.isoformat()


class _Flight:
    """A file's chunks being committed, oldest first, each settled into its run's
    progress once it and every chunk before it were kept, and then saved (`saves`)."""

    def __init__(self, run: Run, file: File, saves: _Saves) -> None:
        self.run, self.file, self.saves = run, file, saves
        self._chunks: deque[tuple[Chunk, asyncio.Future[list[Answer]]]] = deque()
        self._saved = time.monotonic()

    def add(self, chunk: Chunk, accepting: asyncio.Future[list[Answer]]) -> None:
        self._chunks.append((chunk, accepting))

    def accepting(self) -> list[asyncio.Future[list[Answer]]]:
        return [accepting for _, accepting in self._chunks]

    async def settle(self, keep: int) -> None:
        """Settle the chunks in flight, oldest first, until `keep` are left."""
        saves = self.saves
        while len(self._chunks) > keep:
            kept, accepting = self._chunks.popleft()
            answers = await accepting  # (before `saves.errors` is read: a save takes it)
            saves.errors += self._kept(kept, answers)
            last = kept.ended or not self._chunks  # (of a file, or of what it gave)
            if last or time.monotonic() - self._saved >= SAVE_EVERY:
                saves.ask()
                self._saved = time.monotonic()
            if saves.failing:  # no more rows past a save that cannot be written
                await saves.done()

    def _kept(self, chunk: Chunk, answers: list[Answer]) -> list[tuple[str, int, str, str]]:
        """Count `chunk` as kept (with the receiver's `answers`) in the run's progress;
        its errored rows (file, row, column, reason)."""
        fail_point("import.settle_bug")
        run, file = self.run, self.file
        errors = [(file.name, e.row, e.column, e.reason) for e in chunk.errors]
        imported = duplicates = 0
        for at, answer in zip(range(0, len(chunk.signals), PIECE), answers, strict=True):
            for rejected in answer.body.get("rejected", []):
                row = chunk.numbers[at + rejected["index"]]
                errors.append((file.name, row, "", rejected["error"]))
            imported += answer.body.get("accepted", 0)
            duplicates += answer.body.get("duplicates", 0)
        if chunk.last:
            processing = run.processing
            processing.rows += chunk.last - file.rows_done
            processing.imported += imported
            processing.duplicates += duplicates
            processing.errored += len(errors)
            file.rows_done = chunk.last
            _count(run.task, imported, duplicates, len(errors))
        return errors

    async def settle_while(self, reading: asyncio.Future[Chunk]) -> None:
        """Settle each chunk in flight as soon as it is kept, until `reading` (the next
        chunk) is done: a read that waits (a file still arriving, a slow reader) must
        not hold back the saves of chunks kept meanwhile, which a crash would send
        again after their batches were delivered."""
        while self._chunks and not reading.done():
            oldest = self._chunks[0][1]
            either: list[asyncio.Future[Any]] = [reading, oldest]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if oldest.done():
                await self.settle(len(self._chunks) - 1)


class _Saves:
    """A run's progress saves, each written in a thread while the run's rows go on, one
    at a time: a save asked for while one is being written follows it (one, however
    often it was asked for). Each is taken when its writing begins (`TaskStore.progress`),
    so it holds everything settled by then. A write that fails (the disk) is logged as
    `import.save_failed` and made again after a pause (1 s, doubling to 30 s), as the
    rows are offered again while the receiver refuses; meanwhile (`failing`) the run
    takes no more rows: each row kept past the last save is one a crash sends again."""

    def __init__(self, store: TaskStore, run: Run) -> None:
        self.store, self.run = store, run
        self.errors: list[tuple[str, int, str, str]] = []  # errored rows not yet saved
        self._writing: asyncio.Task[None] | None = None
        self._again = False
        self.failing = False  # the last write failed, and is being made again

    def ask(self) -> None:
        """Save everything settled so far: now, or once the save being written is. A
        save that failed raises its error here (or in `done`)."""
        writing = self._writing
        if writing is not None and not writing.done():
            self._again = True
            return
        if writing is not None:
            writing.result()
        self._writing = asyncio.ensure_future(self._write())

    async def done(self) -> None:
        """Wait until every save asked for is written; a failed one's error. (Shielded:
        a save cancelled here would go on being written in its thread all the same.)"""
        if self._writing is not None:
            await asyncio.shield(self._writing)

    async def ended(self) -> None:
        """Stop the saves of a file that ends: after `done`, nothing is left; else the
        run stops on an error or with the daemon, and a save being written again after
        a disk error must not hold that up (a write already in its thread ends there;
        the run saves nothing after it in this process)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.cancel()
            await asyncio.wait([writing])
            if not writing.cancelled():
                writing.exception()  # retrieved: a failed run says its own error
        self.store.saves_ended(self.run)

    async def _write(self) -> None:
        while True:
            self._again = False
            errors, self.errors = sorted(self.errors, key=lambda e: e[1]), []
            progress = self.store.progress(self.run, errors)
            pauses = _pauses()
            while True:  # a failed write is written again (it cuts what it left first)
                try:
                    await asyncio.to_thread(self.store.write_progress, progress)
                    self.failing = False
                    break
                except OSError as exc:
                    self.failing = True
                    pause = next(pauses)
                    log.warning(
                        "import.save_failed",
                        task=self.run.task,
                        run=self.run.id,
                        error=str(exc),
                        seconds=pause,
                    )
                    await asyncio.sleep(pause)
            if not self._again:
                return


def _new_files(
    listed: list[RemoteFile], ledger: Ledger, settled: dict[tuple[str, int, str], int]
) -> list[File]:
    """The files of a listing that no run has taken yet, as a run's files: each read on
    after the rows an earlier run `settled` of it (`TaskStore.unfinished`)."""
    return [
        File(
            name=f.name,
            size=f.size,
            version=f.version,
            data=f"{n}.gz" if f.name.endswith(".gz") else str(n),
            gzip=f.name.endswith(".gz"),
            rows_done=settled.get((f.name, f.size, f.version), 0),
        )
        for n, f in enumerate(listed)
        if (f.name, f.size, f.version) not in ledger
    ]


def _relisted(run: Run, listed: list[RemoteFile], ledger: Ledger) -> None:
    """The files of `run` not yet fetched, as the source lists them now: a file changed
    since is taken in its new version (its rows' ids hold it); one gone, or taken by
    another run meanwhile, is not fetched (gone: said as its error)."""
    now_listed = {f.name: f for f in listed}
    for file in run.files:
        if file.fetched or file.done:
            continue
        found = now_listed.get(file.name)
        if found is None:
            file.fetched = file.done = True
            file.error = REMOVED
            continue
        if file.rows_done and (found.size, found.version) != (file.size, file.version):
            # Its rows read as it arrived are kept; the new version's have other ids.
            log.warning(
                "import.file_replaced_midway", run=run.id, file=file.name, rows=file.rows_done
            )
            file.rows_done = 0
        file.size, file.version = found.size, found.version
        if (found.name, found.size, found.version) in ledger:
            file.fetched = file.done = True


def _emptied(path: Path) -> None:
    """Create `path` empty, or empty it: a fetch then writes it in place, from its start,
    and a reader may open it first. Blocking: call it in a thread."""
    path.write_bytes(b"")


def _pauses() -> Iterator[float]:
    """Seconds to wait before each next attempt: RETRY_FIRST, doubling to RETRY_MAX."""
    pause = RETRY_FIRST
    while True:
        yield pause
        pause = min(pause * 2, RETRY_MAX)


async def _until_done(
    attempt: Callable[[bool], Awaitable[None]], event: str, **fields: str
) -> None:
    """Await `attempt(again)` until it returns: an error that escapes it is logged as
    `event` (with its traceback and `fields`), and it is made again (`again` True) after
    a pause from `_pauses`. Cancelling ends it."""
    pauses = _pauses()
    again = False
    while True:
        try:
            await attempt(again)
            return
        except Exception:
            pause = next(pauses)
            log.exception(event, seconds=pause, **fields)
        raise_if_cancelled()  # (the error may be a cancellation, lost in a wait_for)
        await asyncio.sleep(pause)
        again = True


def _latest_slot(schedule: str, zone: ZoneInfo, after: float, until: float) -> float | None:
    """The latest slot of `schedule` in (after, until], or None."""
    start = max(after, until - MISSED_LOOKBACK)
    latest = None
    for slot in CronSim(schedule, datetime.fromtimestamp(start, zone)):
        at = slot.timestamp()
        if at > until:
            break
        latest = at
    return latest


async def _receive(chunks: AsyncIterator[bytes], target: Path, limit: int, sync: bool) -> int:
    """Write an upload's body to `target` (durably); its size. 413 past `limit`."""
    size = 0
    out = await asyncio.to_thread(target.open, "wb")
    write = Paced(out).write if sync else out.write  # written out as it comes: PACE
    try:
        async for data in chunks:
            size += len(data)
            if size > limit:
                raise UploadError(413, f"upload over server.max_upload ({limit} bytes)")
            await asyncio.to_thread(write, data)
        if sync:
            await asyncio.to_thread(sync_file, out)
    finally:
        await asyncio.to_thread(out.close)
    if sync:
        await asyncio.to_thread(fsync_dir, target.parent)
    return size


def _count(task: str, imported: int, duplicates: int, errored: int) -> None:
    for outcome, n in (("imported", imported), ("duplicate", duplicates), ("errored", errored)):
        if n:
            metrics.import_rows.labels(task, outcome).inc(n)
