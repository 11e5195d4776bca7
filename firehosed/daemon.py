"""The daemon's life in named steps: start, serve, drain, stop.

Signal handlers only set flags: SIGTERM/SIGINT ask for a drain (a second SIGINT stops at
once), SIGHUP asks for a reload. Every task is tracked in `_tasks`; a task that dies
logs its error. Reload builds everything new before touching what runs, so an invalid
file, or one that cannot be applied, leaves the old config serving.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import os
import signal
import time
from collections.abc import AsyncIterator, Coroutine
from datetime import date
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from firehosed import config as config_module
from firehosed import metrics
from firehosed.admin import app as admin_app
from firehosed.admin.history import History
from firehosed.alerts import Alerts
from firehosed.archive.archiver import Archiver
from firehosed.catchup import CatchUp
from firehosed.channels import open_channel
from firehosed.channels.base import Channel
from firehosed.config import Config
from firehosed.delivery import Worker
from firehosed.errors import ConfigError, FirehosedError
from firehosed.fileio import make_dirs
from firehosed.firehose import Firehose
from firehosed.imports.importer import Importer
from firehosed.ingest import app as ingest_app
from firehosed.ingest import idle
from firehosed.ingest.receiver import Receiver
from firehosed.jetstream.cluster import Cluster, process_id
from firehosed.jetstream.partitions import Owners, Partitioner
from firehosed.jetstream.queue import JetStreamBackend
from firehosed.mapping import Mapping
from firehosed.queue.base import Backend, Manifest, QueueFigures
from firehosed.queue.local import LocalBackend
from firehosed.router import AccountRoutes, Router, Routes
from firehosed.systemd import Notifier
from firehosed.tap import Tap

log = structlog.get_logger(__name__)

# The young generation is collected every 10,000 allocations (net of frees), not
# Python's 700: one group commit's requests, in flight together, hold more than 700
# objects, so the default set off a collection nearly every round (bench/RESULTS-seam-ab.md).
# The older generations keep collecting at twice their usual ratio's interval.
GC_THRESHOLDS = (10_000, 20, 20)

LOOP_LAG_EVERY = 0.1  # seconds between the loop-lag watch's timers
BUDGET_REFRESH = 0.01  # seconds: how stale the disk budget `refusal` reads may be
STOP_GRACE = 5.0  # seconds the stop waits for cancelled tasks to end


class Daemon:
    """One firehosed process: receiver, router, queues and one delivery worker per firehose."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.storage = Path(config.storage.dir)
        self.catch_up = CatchUp(config.catch_up)
        self.router = Router(self.catch_up)
        self.tap = Tap()  # live events for the admin listener's tail
        self.history = History()  # the status page's last hour
        routes: Routes = self.router
        self.cluster: Cluster | None = None  # storage.backend = "jetstream"
        self.backend: Backend
        if config.storage.backend == "jetstream":
            self.cluster = Cluster(config.jetstream, me="")  # (named at start)
            self.backend = JetStreamBackend(self.cluster, self.storage)
            self.owners: Owners | None = None
            routes = Partitioner(self.cluster, self.router)
        else:
            self.backend = LocalBackend(
                self.storage, config.storage.segment_size, config.storage.durability
            )
        self.receiver = Receiver(routes, config.server, self.refusal, self.tap)
        sync = config.storage.durability == "fsync"
        self.importer = Importer(self.storage / "imports", self.receiver, sync)
        self.alerts = Alerts(config.alerts)
        self.notifier = Notifier.from_environ()
        self.firehoses: dict[str, Firehose] = {}
        self.workers: dict[str, Worker] = {}
        self.channels: dict[str, Channel] = {}
        self.accepting = False
        # Why this process can no longer keep what it accepts (its committer ended), if so.
        self.broken: str | None = None
        self._shares: dict[str, list[tuple[str, int]]] = {}  # account: (firehose, max_queued)
        # Account: (id, received) of records its queues held at open, for its dedupe.
        self._recovered: dict[str, list[tuple[str, float]]] = {}
        # The last budget measured, and until when (monotonic) it stands (`refusal`).
        self._budget: tuple[str | None, dict[str, str]] = (None, {})
        self._budget_until = 0.0
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._runners: list[web.ServerRunner] = []  # the ingest and admin listeners
        self._reloading = asyncio.Lock()  # SIGHUP and POST /v1/reload, one at a time
        self._lock_fd: int | None = None
        self._interrupts = 0

    # -- start ----------------------------------------------------------------------

    async def start(self) -> None:
        """Recover storage, start workers, bind the listener, tell systemd we are ready."""
        started = time.monotonic()
        make_dirs(self.storage, self.config.storage.durability == "fsync")
        self._lock_storage()
        if isinstance(self.backend, JetStreamBackend):
            self.backend.cluster.me = process_id(self.storage)
            await self.backend.connect()
        self._track("committer", self.backend.run())
        await self._apply(self.config)
        if isinstance(self.backend, JetStreamBackend):
            self.owners = Owners(self.backend.cluster, self.backend.leases, self.router)
            self._track("partitions", self.owners.run())
        self._warn_orphans()
        await self._listen()
        self._install_signals()
        self._track("watchdog", self.notifier.run_watchdog())
        self._track("history", self.history.run())
        self._track("loop_lag", _watch_loop_lag())
        # What start built lives as long as the process: out of the cyclic collector's
        # sight, a full collection under load walks only what requests made since.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        self.accepting = True
        self.notifier.ready()
        log.info(
            "daemon.ready",
            listen=self.config.server.listen,
            admin=self.config.admin.listen,
            firehoses=len(self.firehoses),
            queued=sum(f.records for f in self._figures()),
            seconds=round(time.monotonic() - started, 3),
        )

    def _lock_storage(self) -> None:
        """One daemon per storage dir: two writers would corrupt the queues."""
        self._lock_fd = os.open(self.storage / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FirehosedError(f"{self.storage} is in use by another firehosed process") from None

    async def _listen(self) -> None:
        """Bind the admin listener, then the ingest one (sources come last). Each has its
        own idle sweep, which its dispatcher tells when a connection is busy."""
        reaper = idle.IdleReaper(self.config.admin.idle_timeout)
        admin = admin_app.build_server(
            self,
            self.tap,
            self.history,
            reaper.since,
            access_log=None,
            keepalive_timeout=self.config.admin.idle_timeout,
        )
        self._track("idle:admin", reaper.run(admin))
        await self._bind(admin, self.config.admin.listen)
        reaper = idle.IdleReaper(self.config.server.idle_timeout)
        # auto_decompress off: the receiver inflates gzip itself, capped at max_body.
        ingest = ingest_app.build_server(
            self.receiver,
            reaper.since,
            importer=self.importer,
            access_log=None,
            auto_decompress=False,
            # aiohttp arms this timer at connection open and after each answer, and closes
            # the connection if no complete request head arrived: it bounds slow headers too.
            keepalive_timeout=self.config.server.idle_timeout,
        )
        self._track("idle", reaper.run(ingest))
        await self._bind(ingest, self.config.server.listen)

    async def _bind(self, server: web.Server, listen: str) -> None:
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        site: web.BaseSite
        if listen.startswith("unix:"):
            site = web.UnixSite(runner, listen.removeprefix("unix:"))
        else:
            host, _, port = listen.rpartition(":")
            site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True)
        await site.start()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self._interrupt)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)

    def request_stop(self) -> None:
        """Begin a graceful drain."""
        self._stop.set()

    def _interrupt(self) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            log.warning("daemon.forced_exit")
            os._exit(130)
        self.request_stop()

    # -- serve ----------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until asked to stop, applying reloads as they are asked for."""
        while not self._stop.is_set():
            reload = asyncio.ensure_future(self._reload.wait())
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({reload, stop}, return_when=asyncio.FIRST_COMPLETED)
            reload.cancel()
            stop.cancel()
            if self._reload.is_set() and not self._stop.is_set():
                self._reload.clear()
                await self.reload()

    async def reload(self) -> list[str]:
        """Re-read the config file; keep the running config if it is invalid. The
        problems found (`file:line: key: message`), none when the new config runs."""
        async with self._reloading:
            self.notifier.reloading()
            try:
                new = await asyncio.to_thread(config_module.load, self.config.path)
                await self._apply(new)
                for firehose in self.firehoses.values():  # dead letters removed by hand
                    await firehose.queue.recount()
                self._budget_until = 0.0
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("config.invalid", problem=problem)
                log.error("config.reload_rejected", path=self.config.path, errors=len(exc.problems))
                return exc.problems
            finally:
                self.notifier.reloaded()
        log.info("config.reloaded", path=new.path, firehoses=len(self.firehoses))
        return []

    async def _apply(self, config: Config) -> None:
        """Make `config` the running one: channels, firehoses, workers, accounts, routes."""
        if self.firehoses and _restart_needed(self.config, config):
            log.warning("config.restart_needed", keys="server.listen, admin.listen, storage")
        channels = self._channels_for(config)
        wanted = config.all_firehoses()
        for name, fh_config in wanted.items():
            mapping = Mapping(config.mappings[fh_config.mapping]) if fh_config.mapping else None
            channel = channels[fh_config.channel]
            dead = channels[fh_config.dead_letter] if fh_config.dead_letter else None
            if name in self.firehoses:
                old = self.firehoses[name].config
                if (old.format == "zip-csv") != (fh_config.format == "zip-csv"):
                    # A daily archive spills its queue, others deliver it: not switched
                    # under a running worker.
                    log.warning("config.restart_needed", keys=f"firehoses.{name}.format")
                    continue
                self.firehoses[name].configure(fh_config, mapping)
                self.workers[name].configure(channel, dead)
            else:
                await self._add_firehose(name, fh_config, mapping, channel, dead)
        for name in self.firehoses.keys() - wanted.keys():
            self._retire(name)
        self._set_accounts(config, wanted)
        self._remember_recovered()
        await self._close_unused_channels(channels)
        self.channels = channels
        await self.importer.configure(config, channels)
        self.catch_up.reconfigure(config.catch_up)
        self.alerts.reconfigure(config.alerts)
        self.config = config

    def _channels_for(self, config: Config) -> dict[str, Channel]:
        """Channels for `config`, reusing the running ones whose settings did not change."""
        channels = {}
        for name, channel_config in config.channels.items():
            old = self.channels.get(name)
            same = old is not None and self.config.channels.get(name) == channel_config
            channels[name] = old if same and old is not None else open_channel(name, channel_config)
        return channels

    async def _add_firehose(
        self,
        name: str,
        config: Any,
        mapping: Mapping | None,
        channel: Channel,
        dead: Channel | None,
    ) -> None:
        queue = await self.backend.open_queue(name)
        self._recovered.setdefault(config.account, []).extend(queue.recovered_ids())
        firehose = Firehose(name, config, queue, mapping)
        archive = None
        if config.format == "zip-csv":
            fields = self.config.accounts[config.account].fields
            root = self.storage / "archive" / name
            sync = self.config.storage.durability == "fsync"
            archive = Archiver(name, config, fields, mapping, root, sync=sync)
        worker = Worker(firehose, channel, dead, self.alerts, self.tap, archive=archive)
        self.firehoses[name], self.workers[name] = firehose, worker
        self._track(f"worker:{name}", self._run_worker(worker))
        queued = queue.figures(time.time()).records
        log.info("firehose.started", firehose=name, channel=channel.name, queued=queued)

    async def _run_worker(self, worker: Worker) -> None:
        """Run a worker; a crash (a bug) is logged and the worker restarted, never silent."""
        while True:
            try:
                await worker.run()
                break
            except Exception:
                log.exception("worker.crashed", firehose=worker.name)
                await asyncio.sleep(1.0)
        if worker.retired:
            log.info("firehose.retired", firehose=worker.name)
            self.workers.pop(worker.name, None)
            firehose = self.firehoses.pop(worker.name, None)
            if firehose is not None:
                firehose.queue.close()

    def _retire(self, name: str) -> None:
        """A firehose left the config: stop routing to it, deliver its backlog, then end."""
        worker = self.workers[name]
        worker.retire()
        queued = worker.queue.figures(time.time()).records
        log.info("firehose.retiring", firehose=name, queued=queued)

    def _remember_recovered(self) -> None:
        """Records found in the queues at open count as accepted (dedupe): a request
        whose answer a crash cut off is retried as duplicates, not kept twice."""
        for account, recovered in self._recovered.items():
            ingest = self.receiver.accounts.get(account)
            if ingest is None:
                continue
            for record_id, received in sorted(recovered, key=lambda r: r[1]):
                ingest.dedupe.remember(record_id, received)
            log.info("dedupe.recovered", account=account, ids=len(recovered))
        self._recovered.clear()

    def _set_accounts(self, config: Config, firehoses: dict[str, Any]) -> None:
        self.receiver.configure(config.server, config.accounts)
        self.router.accounts = {
            name: AccountRoutes(
                account.fields,
                [self.firehoses[f] for f, c in firehoses.items() if c.account == name],
            )
            for name, account in config.accounts.items()
        }
        # Each firehose's share of max_disk, by account: one stuck firehose must not
        # take the whole budget and refuse every account.
        whole = config.storage.max_disk
        default = whole // 2 if len(firehoses) > 1 else whole
        self._budget_until = 0.0  # measure again with the new shares
        self._shares = {
            name: [
                (f, c.max_queued if c.max_queued is not None else default)
                for f, c in firehoses.items()
                if c.account == name
            ]
            for name in config.accounts
        }

    async def _close_unused_channels(self, channels: dict[str, Channel]) -> None:
        in_use = {id(w.channel) for w in self.workers.values()}
        for channel in self.channels.values():
            if id(channel) not in in_use and channel not in channels.values():
                await channel.close()

    def _warn_orphans(self) -> None:
        queues = self.storage / "queues"
        if queues.is_dir():
            for path in queues.iterdir():
                if path.name not in self.firehoses:
                    log.warning("queue.orphaned", firehose=path.name, path=str(path))

    # -- drain and stop -------------------------------------------------------------

    async def drain(self) -> None:
        """Stop accepting, cut open batches, deliver within `drain_timeout`."""
        self.accepting = False
        self.notifier.stopping()
        log.info("daemon.draining", timeout=self.config.server.drain_timeout)
        await self.importer.stop()  # a run resumes where it was at the next start
        if "committer" in self._tasks:  # (a committer that died cannot write any more)
            await self.backend.flush()
        for worker in self.workers.values():
            worker.drain()
        running = [t for n, t in self._tasks.items() if n.startswith("worker:")]
        if running:
            await asyncio.wait(running, timeout=self.config.server.drain_timeout)

    async def stop(self) -> None:
        """Stop workers and the listener, close channels and queues; log one summary line."""
        await self.importer.stop()
        for worker in self.workers.values():
            worker.stop()
        self.tap.close()  # tails end, so the admin listener can close
        for runner in reversed(self._runners):
            await runner.cleanup()
        if "committer" in self._tasks:
            await self.backend.flush()
        for task in self._tasks.values():
            task.cancel()
        # Bounded: a task that lost its cancellation (asyncio.wait_for in Python 3.11 can
        # drop one that races a result) must not hold the stop for ever.
        if self._tasks:
            _, left = await asyncio.wait(self._tasks.values(), timeout=STOP_GRACE)
            if left:
                log.warning("daemon.tasks_left", tasks=sorted(t.get_name() for t in left))
        for channel in self.channels.values():
            await channel.close()
        await self.alerts.close()
        if isinstance(self.backend, JetStreamBackend):
            await self.backend.close()  # (its leases given up at once, before the queues)
        for firehose in self.firehoses.values():
            firehose.queue.close()
        log.info(
            "daemon.stopped",
            queued=sum(f.records for f in self._figures()),
            batches_pending=sum(f.batches for f in self._figures()),
        )

    # -- what the HTTP side asks ----------------------------------------------------

    def refusal(self, account: str | None = None) -> str | None:
        """Why ingest (for `account`, or for any account) must answer 503 now, or None.

        Queued records, dead letters and quarantined records all count against
        `max_disk`; each firehose's queued bytes against its `max_queued` share too.
        The budget is measured at most every BUDGET_REFRESH seconds, not per request
        (measuring every queue per request cost a single-signal POST 5 µs).
        """
        if self.broken is not None:
            return self.broken
        if not self.accepting:
            return "not accepting signals: starting or shutting down"
        if self.cluster is not None and not self.cluster.connected.is_set():
            return "the JetStream cluster is unreachable"
        now = time.monotonic()
        if now >= self._budget_until:
            self._budget = self._measure_budget()
            self._budget_until = now + BUDGET_REFRESH
        full, by_account = self._budget
        if full is not None or account is None:
            return full
        return by_account.get(account)

    def _measure_budget(self) -> tuple[str | None, dict[str, str]]:
        """(why every account is refused, or None; why each refused account is)."""
        if self.cluster is not None:  # the cluster's own limits apply (a publish fails)
            return None, {}
        now = time.time()
        figures = {name: f.queue.figures(now) for name, f in self.firehoses.items()}
        # A daily archive's spilled days are queued records too, out of the queue.
        spilled = {name: w.archive.spill.bytes for name, w in self.workers.items() if w.archive}
        queued = sum(f.bytes for f in figures.values()) + sum(spilled.values())
        dead = sum(f.dead_bytes for f in figures.values())
        limit = self.config.storage.max_disk
        if queued + dead > limit:
            full = (
                f"storage is full: {queued} bytes queued and {dead} dead-lettered or "
                f"quarantined, max_disk is {limit}"
            )
            return full, {}
        by_account = {}
        for account, shares in self._shares.items():
            for name, share in shares:
                held = (figures[name].bytes if name in figures else 0) + spilled.get(name, 0)
                if held > share:
                    by_account[account] = (
                        f"firehose {name} is full: {held} bytes queued, its max_queued is {share}"
                    )
                    break
        return None, by_account

    def admin_token(self) -> str | None:
        """The bearer token the admin listener asks for (None: none), as last loaded."""
        return self.config.admin.token

    def disk_used(self) -> int:
        """Bytes the queues hold on disk."""
        return sum(f.disk_bytes for f in self._figures())

    def _figures(self) -> list[QueueFigures]:
        now = time.time()
        return [f.queue.figures(now) for f in self.firehoses.values()]

    def replay(self, firehose: str) -> AsyncIterator[Manifest] | None:
        """Dead batches of `firehose` back into delivery; None if no such firehose runs."""
        worker = self.workers.get(firehose)
        return worker.replay() if worker is not None else None

    def archive_day(
        self, firehose: str, day: date, *, force: bool
    ) -> AsyncIterator[dict[str, Any]] | None:
        """`firehosed archive --day`: one archive firehose's day, built and delivered now."""
        worker = self.workers.get(firehose)
        return worker.archive_day(day, force=force) if worker is not None else None

    def import_run(self, run: str) -> dict[str, Any] | None:
        """`firehosed imports --run`: one import run, of any account."""
        return self.importer.run_document(None, run)

    def status(self) -> dict[str, Any]:
        """The `/v1/status` document."""
        return {
            "accepting": self.accepting,
            "storage_bytes": self.disk_used(),
            "storage_max_bytes": int(self.config.storage.max_disk),
            "catch_up_sessions": len(self.catch_up),
            "catch_up_bytes": self.catch_up.memory,
            "catch_up_max_bytes": int(self.config.catch_up.max_memory),
            "firehoses": {name: w.status() for name, w in sorted(self.workers.items())},
            "imports": self.importer.status(),
            **self._cluster_status(),
        }

    def _cluster_status(self) -> dict[str, Any]:
        if not isinstance(self.backend, JetStreamBackend):
            return {}
        return {"cluster": self.backend.leases.status()}

    def update_metrics(self) -> None:
        """Refresh gauges read at scrape time."""
        self.catch_up.update_metrics()
        metrics.disk_bytes.set(self.disk_used())
        if isinstance(self.backend, JetStreamBackend):
            cluster = self.backend.leases.status()
            metrics.cluster_connected.set(cluster["connected"])
            metrics.cluster_members.set(len(cluster["members"]))
            held = cluster["held_here"]
            metrics.cluster_partitions.set(sum(1 for key in held if key.startswith("part.")))

    def queue_figures(self) -> list[metrics.QueueFigures]:
        """Per-firehose queue figures for the Prometheus collector."""
        now = time.time()
        figures = [(name, f.queue.figures(now)) for name, f in self.firehoses.items()]
        return [
            metrics.QueueFigures(n, f.records, f.bytes, f.oldest_age, f.dead_bytes)
            for n, f in figures
        ]

    # -- tasks ----------------------------------------------------------------------

    def _track(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        name = task.get_name()
        if self._tasks.get(name) is task:
            del self._tasks[name]
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("task.failed", task=name, error=repr(error), exc_info=error)
        if name == "committer" and not task.cancelled():
            self._committer_ended(task)

    def _committer_ended(self, task: asyncio.Task[None]) -> None:
        """Nothing can be made durable any more: refuse ingest, fail readiness, and stop
        the watchdog pings, so that systemd restarts the process."""
        error = task.exception()
        self.broken = f"storage committer stopped: {error!r}" if error else "committer stopped"
        log.critical("daemon.broken", reason=self.broken)
        self.notifier.status(self.broken)
        watchdog = self._tasks.get("watchdog")
        if watchdog is not None:
            watchdog.cancel()


async def _watch_loop_lag(every: float = LOOP_LAG_EVERY) -> None:
    """Note how late the loop runs a timer (`firehosed_event_loop_lag_seconds`): work
    that holds the loop (a big body, an import's rows) shows here, not only as slow
    answers."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + every
        await asyncio.sleep(every)
        metrics.loop_lag.observe(max(0.0, loop.time() - due))


def _restart_needed(old: Config, new: Config) -> bool:
    return (
        old.server.listen != new.server.listen
        or old.admin.listen != new.admin.listen
        or old.storage != new.storage
    )


async def run(config: Config) -> int:
    """The whole life of the daemon; the exit status."""
    daemon = Daemon(config)
    collector = metrics.QueueCollector(daemon.queue_figures)
    metrics.REGISTRY.register(collector)
    try:
        await daemon.start()
        await daemon.serve()
        await daemon.drain()
    finally:
        await daemon.stop()
        metrics.REGISTRY.unregister(collector)
    return 0
