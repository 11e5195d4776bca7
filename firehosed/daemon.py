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
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from firehosed import config as config_module
from firehosed import metrics
from firehosed.alerts import Alerts
from firehosed.catchup import CatchUp
from firehosed.channels import Channel, open_channel
from firehosed.config import AccountConfig, Config
from firehosed.dedupe import Dedupe
from firehosed.delivery import Worker
from firehosed.envelope import EnvelopeReader
from firehosed.errors import ConfigError, FirehosedError
from firehosed.firehose import Firehose
from firehosed.ingest import idle
from firehosed.ingest.app import build_server
from firehosed.mapping import Mapping
from firehosed.queue.commit import Committer
from firehosed.queue.store import FirehoseQueue
from firehosed.router import AccountRoutes, Router
from firehosed.systemd import Notifier

log = structlog.get_logger(__name__)


class IngestAccount:
    """What the receiver needs of an account: tokens, envelope reader, dedupe memory."""

    def __init__(self, name: str, config: AccountConfig, dedupe: Dedupe | None) -> None:
        self.name = name
        self.tokens = [t.encode() for t in config.tokens]
        self.reader = EnvelopeReader(config.fields)
        self.dedupe = dedupe or Dedupe(config.dedupe_window, config.dedupe_max)
        self.dedupe.window, self.dedupe.limit = config.dedupe_window, config.dedupe_max
        self.accepted = metrics.signals_accepted.labels(name)
        self.rejected = metrics.signals_rejected.labels(name)
        self.duplicates = metrics.signals_duplicate.labels(name)


class Daemon:
    """One firehosed process: receiver, router, queues and one delivery worker per firehose."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.storage = Path(config.storage.dir)
        self.committer = Committer(config.storage.durability)
        self.catch_up = CatchUp(config.catch_up)
        self.router = Router(self.catch_up, self.committer)
        self.alerts = Alerts(config.alerts)
        self.notifier = Notifier.from_environ()
        self.accounts: dict[str, IngestAccount] = {}
        self.firehoses: dict[str, Firehose] = {}
        self.workers: dict[str, Worker] = {}
        self.channels: dict[str, Channel] = {}
        self.accepting = False
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._runner: web.ServerRunner | None = None
        self._lock_fd: int | None = None
        self._interrupts = 0

    # -- start ----------------------------------------------------------------------

    async def start(self) -> None:
        """Recover storage, start workers, bind the listener, tell systemd we are ready."""
        started = time.monotonic()
        self.storage.mkdir(parents=True, exist_ok=True)
        self._lock_storage()
        self._track("committer", self.committer.run())
        await self._apply(self.config)
        self._warn_orphans()
        await self._listen()
        self._install_signals()
        self._track("watchdog", self.notifier.run_watchdog())
        # What start built lives as long as the process: out of the cyclic collector's
        # sight, a full collection under load walks only what requests made since.
        gc.collect()
        gc.freeze()
        self.accepting = True
        self.notifier.ready()
        log.info(
            "daemon.ready",
            listen=self.config.server.listen,
            firehoses=len(self.firehoses),
            queued=sum(f.queue.queued_records() for f in self.firehoses.values()),
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
        # auto_decompress off: the receiver inflates gzip itself, capped at max_body.
        server = build_server(
            self,
            access_log=None,
            auto_decompress=False,
            # aiohttp arms this timer at connection open and after each answer, and closes
            # the connection if no complete request head arrived: it bounds slow headers too.
            keepalive_timeout=self.config.server.idle_timeout,
        )
        self._track("idle", idle.reap(server, self.config.server.idle_timeout))
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        listen = self.config.server.listen
        site: web.BaseSite
        if listen.startswith("unix:"):
            site = web.UnixSite(self._runner, listen.removeprefix("unix:"))
        else:
            host, _, port = listen.rpartition(":")
            site = web.TCPSite(self._runner, host.strip("[]"), int(port), reuse_address=True)
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

    async def reload(self) -> bool:
        """Re-read the config file; keep the running config if it is invalid."""
        self.notifier.reloading()
        try:
            new = await asyncio.to_thread(config_module.load, self.config.path)
            await self._apply(new)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config.invalid", problem=problem)
            log.error("config.reload_rejected", path=self.config.path, errors=len(exc.problems))
            return False
        finally:
            self.notifier.reloaded()
        log.info("config.reloaded", path=new.path, firehoses=len(self.firehoses))
        return True

    async def _apply(self, config: Config) -> None:
        """Make `config` the running one: channels, firehoses, workers, accounts, routes."""
        if self.firehoses and _restart_needed(self.config, config):
            log.warning("config.restart_needed", keys="server.listen, storage")
        channels = self._channels_for(config)
        wanted = config.all_firehoses()
        for name, fh_config in wanted.items():
            mapping = Mapping(config.mappings[fh_config.mapping]) if fh_config.mapping else None
            channel = channels[fh_config.channel]
            dead = channels[fh_config.dead_letter] if fh_config.dead_letter else None
            if name in self.firehoses:
                self.firehoses[name].configure(fh_config, mapping)
                self.workers[name].channel = channel
                self.workers[name].retiring = False
                self.workers[name].gone = None  # a reload resumes a firehose stopped by 410
                self.workers[name].dead_channel = dead
                self.workers[name].nudge()
            else:
                await self._add_firehose(name, fh_config, mapping, channel)
                self.workers[name].dead_channel = dead
        for name in self.firehoses.keys() - wanted.keys():
            self._retire(name)
        self._set_accounts(config, wanted)
        await self._close_unused_channels(channels)
        self.channels = channels
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
        self, name: str, config: Any, mapping: Mapping | None, channel: Channel
    ) -> None:
        storage = self.config.storage
        queue = FirehoseQueue(
            self.storage / "queues" / name,
            name,
            storage.segment_size,
            storage.durability == "fsync",
        )
        await asyncio.to_thread(queue.open)
        firehose = Firehose(name, config, queue, mapping)
        worker = Worker(firehose, channel, self.storage / "dead", self.alerts)
        queue.on_commit = worker.committed
        queue.on_dirty = self.committer.wake_later
        queue.cutter = worker
        self.firehoses[name], self.workers[name] = firehose, worker
        self._track(f"worker:{name}", self._run_worker(worker))
        log.info(
            "firehose.started", firehose=name, channel=channel.name, queued=queue.queued_records()
        )

    async def _run_worker(self, worker: Worker) -> None:
        """Run a worker; a crash (a bug) is logged and the worker restarted, never silent."""
        while True:
            try:
                await worker.run()
                break
            except Exception:
                log.exception("worker.crashed", firehose=worker.name)
                await asyncio.sleep(1.0)
        if worker.retiring and not worker.draining and not worker.stopping:
            log.info("firehose.retired", firehose=worker.name)
            self.workers.pop(worker.name, None)
            firehose = self.firehoses.pop(worker.name, None)
            if firehose is not None:
                firehose.queue.close()

    def _retire(self, name: str) -> None:
        """A firehose left the config: stop routing to it, deliver its backlog, then end."""
        worker = self.workers[name]
        worker.retiring = True
        worker.nudge()
        log.info("firehose.retiring", firehose=name, queued=worker.firehose.queue.queued_records())

    def _set_accounts(self, config: Config, firehoses: dict[str, Any]) -> None:
        self.accounts = {
            name: IngestAccount(
                name, account, self.accounts[name].dedupe if name in self.accounts else None
            )
            for name, account in config.accounts.items()
        }
        self.router.accounts = {
            name: AccountRoutes(
                account.fields,
                [self.firehoses[f] for f, c in firehoses.items() if c.account == name],
            )
            for name, account in config.accounts.items()
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
        await self.committer.flush()
        for worker in self.workers.values():
            worker.drain()
        running = [t for n, t in self._tasks.items() if n.startswith("worker:")]
        if running:
            await asyncio.wait(running, timeout=self.config.server.drain_timeout)

    async def stop(self) -> None:
        """Stop workers and the listener, close channels and queues; log one summary line."""
        for worker in self.workers.values():
            worker.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.committer.flush()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        for channel in self.channels.values():
            await channel.close()
        await self.alerts.close()
        for firehose in self.firehoses.values():
            firehose.queue.close()
        log.info(
            "daemon.stopped",
            queued=sum(f.queue.queued_records() for f in self.firehoses.values()),
            batches_pending=sum(len(f.queue.batches) for f in self.firehoses.values()),
        )

    # -- what the HTTP side asks ----------------------------------------------------

    def refusal(self) -> str | None:
        """Why ingest must answer 503 right now, or None."""
        if not self.accepting:
            return "not accepting signals: starting or shutting down"
        queued = sum(f.queue.queued_bytes() for f in self.firehoses.values())
        limit = self.config.storage.max_disk
        if queued > limit:
            return f"storage is full: {queued} bytes queued, max_disk is {limit}"
        return None

    def disk_used(self) -> int:
        """Bytes the queues hold on disk."""
        return sum(f.queue.disk_bytes for f in self.firehoses.values())

    def status(self) -> dict[str, Any]:
        """The `/v1/status` document."""
        return {
            "accepting": self.accepting,
            "storage_bytes": self.disk_used(),
            "catch_up_sessions": len(self.catch_up),
            "firehoses": {name: w.status() for name, w in sorted(self.workers.items())},
        }

    def update_metrics(self) -> None:
        """Refresh gauges read at scrape time."""
        self.catch_up.update_metrics()
        metrics.disk_bytes.set(self.disk_used())

    def queue_figures(self) -> list[metrics.QueueFigures]:
        """Per-firehose queue figures for the Prometheus collector."""
        now = time.time()
        return [
            metrics.QueueFigures(
                name, f.queue.queued_records(), f.queue.queued_bytes(), f.queue.oldest_age(now)
            )
            for name, f in self.firehoses.items()
        ]

    # -- tasks ----------------------------------------------------------------------

    def _track(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._tasks.get(task.get_name()) is task:
            del self._tasks[task.get_name()]
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("task.failed", task=task.get_name(), error=repr(error), exc_info=error)


def _restart_needed(old: Config, new: Config) -> bool:
    return old.server.listen != new.server.listen or old.storage != new.storage


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
