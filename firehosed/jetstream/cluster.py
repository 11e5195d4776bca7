"""The connection to a NATS JetStream cluster, its streams and buckets, and leases.

What lives in the cluster (names after `[jetstream] prefix`, "firehosed" here):

    firehosed_SIGNALS   stream   in.<partition>      accepted signals, a block per
                                                     request and partition (ingest)
    firehosed_QUEUES    stream   q.<firehose>        records routed to each firehose
    firehosed-leases    KV, TTL  part.<p>, cut.<f>   who owns a partition or cuts a
                                 member.<process>    firehose; who is alive
    firehosed-state     KV       part.<p>            how far a partition is routed
                                 <f>.m.<no>          a cut batch's manifest
                                 <f>.d.<no>          a dead-lettered batch's manifest
                                 <f>.cursor          where a firehose's next cut starts
    firehosed-batches   objects  <f>/<no>            a file batch's bytes

A lease is a key in a bucket whose entries live `lease_ttl`: its holder renews it
(`update` on the revision it holds) every third of that; a process that stops renewing
loses it when the entry ages out, and anyone may `create` it then. The process id is
kept in `storage.dir`, so a restarted process takes its own leases back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType, StreamConfig
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from firehosed.config import JetStreamConfig
from firehosed.errors import FirehosedError
from firehosed.fileio import write_durably
from firehosed.tasks import raise_if_cancelled

log = structlog.get_logger(__name__)

DUPLICATE_WINDOW = 120.0  # seconds JetStream remembers a message id (de-duplication)
# A cluster that is starting, or has just lost a server, answers for a moment that it
# cannot place a stream's replicas ("no suitable peers for placement": JetStream error
# 10005) or that JetStream is not available yet (10008): setting up streams is tried
# again for this long (seconds), pausing between tries, before it is an error.
SETUP_PATIENCE = 30.0
_NOT_YET = {10005, 10008}


_background: set[asyncio.Future[Any]] = set()


def background(work: Coroutine[Any, Any, Any]) -> None:
    """Run `work` beside the caller (clean-ups that need not be waited for), held until
    it ends so that it is not collected half-way."""
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


class ClusterError(FirehosedError):
    """The cluster cannot be used as configured (unreachable, or unsafe settings)."""


@dataclass(frozen=True, slots=True)
class Names:
    """What the streams and buckets of one deployment are called."""

    prefix: str

    @property
    def signals(self) -> str:
        return f"{self.prefix}_SIGNALS"

    @property
    def queues(self) -> str:
        return f"{self.prefix}_QUEUES"

    def signal_subject(self, partition: int) -> str:
        return f"{self.prefix}.in.{partition}"

    def queue_subject(self, firehose: str) -> str:
        return f"{self.prefix}.q.{firehose}"

    @property
    def leases(self) -> str:
        return f"{self.prefix}-leases"

    @property
    def state(self) -> str:
        return f"{self.prefix}-state"

    @property
    def batches(self) -> str:
        return f"{self.prefix}-batches"


def process_id(storage: Path) -> str:
    """This process's name in the cluster: host, and a random part kept in `storage`
    (a restart of the same process is the same member, and takes its leases back)."""
    path = storage / "jetstream-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        made = f"{socket.gethostname()}-{secrets.token_hex(4)}"
        write_durably(path, made.encode(), sync=True)
        return made


class Cluster:
    """One process's connection to the cluster, and the streams and buckets it uses."""

    def __init__(self, config: JetStreamConfig, me: str) -> None:
        self.config = config
        self.me = me
        self.names = Names(config.prefix)
        self.nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self.leases_kv: KeyValue | None = None
        self.state_kv: KeyValue | None = None
        self.objects: Any = None
        self._buckets: dict[str, KeyValue] = {}
        self.connected = asyncio.Event()
        self._closing = False

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "cluster used before connect()"
        return self._js

    @property
    def leases(self) -> KeyValue:
        assert self.leases_kv is not None
        return self.leases_kv

    @property
    def state(self) -> KeyValue:
        assert self.state_kv is not None
        return self.state_kv

    async def connect(self) -> None:
        """Connect (reconnecting for ever after), then create or check the streams and
        buckets with the configured replicas."""
        config = self.config
        options: dict[str, Any] = {
            "servers": config.servers,
            "name": f"firehosed {self.me}",
            "connect_timeout": config.timeout,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "error_cb": self._error,
            "disconnected_cb": self._disconnected,
            "reconnected_cb": self._reconnected,
        }
        if config.creds_file:
            options["user_credentials"] = config.creds_file
        if config.user is not None:
            options["user"], options["password"] = config.user, config.password
        if config.token is not None:
            options["token"] = config.token
        try:
            self.nc = await nats.connect(**options)
        except Exception as exc:  # nats-py raises several kinds, all meaning "no"
            raise ClusterError(f"cannot reach {', '.join(config.servers)}: {exc}") from exc
        self._js = self.nc.jetstream(timeout=config.timeout)
        self.connected.set()
        if config.replicas == 1:
            await self._check_sync()
        await self._ensure()

    async def _check_sync(self) -> None:
        """With one replica a write is kept only if its server synced it: refuse servers
        that sync on a timer (nats-server's default: every two minutes)."""
        timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for url in self.config.monitor:
                try:
                    async with http.get(f"{url.rstrip('/')}/varz") as answer:
                        varz = await answer.json()
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    raise ClusterError(f"cannot read {url}/varz: {exc}") from exc
                jetstream = varz.get("jetstream", {}).get("config", {})
                if not jetstream.get("sync_always"):
                    every = jetstream.get("sync_interval", 0) / 1e9
                    raise ClusterError(
                        f"replicas = 1, but server {varz.get('server_name', url)} syncs only"
                        f" every {every:g} s: a 202 would not mean kept; set"
                        " `sync_interval: always` in its jetstream block, or use 3 replicas"
                    )

    async def describe(self) -> str:
        """What `firehosed check --connect` says of the cluster (after `connect`)."""
        assert self.nc is not None
        info = await self.js.account_info()
        version = self.nc.connected_server_version
        parts = [
            f"{self.nc.connected_url.netloc if self.nc.connected_url else '?'}"
            f" (nats-server {version.major}.{version.minor}.{version.patch})",
            f"{info.streams} streams",
        ]
        for name in (self.names.signals, self.names.queues):
            stream = await self.js.stream_info(name)
            cluster = stream.cluster
            peers = len(cluster.replicas or []) + 1 if cluster else 1
            parts.append(
                f"{name}: {stream.config.num_replicas} replicas, {peers} up,"
                f" {stream.state.messages} messages"
            )
        return "; ".join(parts)

    async def _ensure(self) -> None:
        """Create or check the streams and buckets; again while the cluster cannot
        place them yet (`_NOT_YET`), for SETUP_PATIENCE seconds."""
        deadline, pause = time.monotonic() + SETUP_PATIENCE, 0.25
        while True:
            try:
                await self._set_up()
            except APIError as exc:
                if exc.err_code not in _NOT_YET or time.monotonic() + pause > deadline:
                    raise ClusterError(
                        f"cannot set up streams on {self.config.servers}: {exc}"
                    ) from exc
                log.warning("jetstream.setup_waiting", reason=exc.description, seconds=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
            else:
                return

    async def _set_up(self) -> None:
        names, replicas, js = self.names, self.config.replicas, self.js
        try:
            await self._stream(names.signals, [f"{names.prefix}.in.*"])
            await self._stream(names.queues, [f"{names.prefix}.q.>"])
            self.leases_kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=names.leases, ttl=self.config.lease_ttl, history=1, replicas=replicas
                )
            )
            self.state_kv = await js.create_key_value(
                KeyValueConfig(bucket=names.state, history=1, replicas=replicas)
            )
            self.objects = await js.create_object_store(
                names.batches, ObjectStoreConfig(replicas=replicas)
            )
            self._buckets = {names.leases: self.leases_kv, names.state: self.state_kv}
        except APIError:
            raise  # (`_ensure` tells the cluster not being ready from the rest)
        except nats.errors.Error as exc:
            raise ClusterError(f"cannot set up streams on {self.config.servers}: {exc}") from exc

    async def _stream(self, name: str, subjects: list[str]) -> None:
        """Create the stream, or check that the existing one has our replicas."""
        wanted = StreamConfig(
            name=name,
            subjects=subjects,
            num_replicas=self.config.replicas,
            storage=StorageType.FILE,
            duplicate_window=DUPLICATE_WINDOW,
        )
        try:
            info = await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(wanted)
            return
        if info.config.num_replicas != self.config.replicas:
            raise ClusterError(
                f"stream {name} has {info.config.num_replicas} replicas, the config says"
                f" {self.config.replicas}: change one of them"
            )

    async def entries(self, bucket: str, pattern: str) -> list[KeyValue.Entry]:
        """The live entries of `bucket` whose keys match the subject pattern `pattern`.

        A watch reads them (nats-py's `keys(filters=...)` matches substrings, not
        patterns); the entry with nothing pending after it is the last. nats-py's own
        "up to date" marker (None) is not trusted: it comes first when the watch's
        consumer had nothing pending as nats-py asked, though the entries the server had
        sent by then may still be on their way. When it comes, or the watch is quiet for
        the timeout, the watch is done only if it has seen every key the stream stores
        (one may have aged out of a bucket with a TTL before it was sent). Quiet for
        three timeouts with keys still unseen (the watch's consumer is gone with its
        server): nats.errors.TimeoutError, as any request the cluster does not answer.
        """
        watcher = await self._buckets[bucket].watch(pattern)
        found: dict[str, KeyValue.Entry] = {}
        seen: set[str] = set()
        quiet = 0
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=self.config.timeout)  # type: ignore[no-untyped-call]
                except nats.errors.TimeoutError:
                    entry, quiet = None, quiet + 1
                if entry is None:
                    if await self._stored(bucket, pattern) <= seen:
                        return list(found.values())
                    if quiet >= 3:
                        raise nats.errors.TimeoutError
                    continue
                quiet = 0
                seen.add(entry.key)
                if entry.operation is None:
                    found[entry.key] = entry
                else:  # (deleted or purged: its marker is what the stream stores)
                    found.pop(entry.key, None)
                if not entry.delta:
                    return list(found.values())
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]

    async def _stored(self, bucket: str, pattern: str) -> set[str]:
        """The keys of `bucket` matching `pattern` its stream stores a message for."""
        prefix = f"$KV.{bucket}."
        stream = await self.js.stream_info(f"KV_{bucket}", subjects_filter=prefix + pattern)
        return {subject.removeprefix(prefix) for subject in stream.state.subjects or ()}

    async def close(self) -> None:
        self._closing = True
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()

    async def _error(self, exc: Exception) -> None:
        log.warning("jetstream.error", error=str(exc) or type(exc).__name__)

    async def _disconnected(self) -> None:
        self.connected.clear()
        if not self._closing:
            log.warning("jetstream.disconnected")

    async def _reconnected(self) -> None:
        self.connected.set()
        log.info("jetstream.reconnected", server=str(self.nc.connected_url) if self.nc else "")


class Lease:
    """One lease this process may hold; `held` is set while it does."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.revision = 0
        self.renewed = 0.0  # monotonic time of the last take or renewal
        self.held = asyncio.Event()
        # Times taken (not renewed): what was read under an earlier take may be stale.
        self.taken = 0

    def set_held(self, revision: int) -> None:
        if not self.held.is_set():
            self.taken += 1
        self.revision = revision
        self.renewed = time.monotonic()
        self.held.set()

    def set_lost(self) -> None:
        self.revision = 0
        self.held.clear()


class Leases:
    """Takes and renews this process's leases: a fair share of each group's keys.

    A group (the partitions, the firehose cutters) has keys; every process alive (a
    `member.<id>` key it renews) takes at most its share, `ceil(keys / members)`, and
    gives up what is over it, so a process that joins gets work within a few renewals.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.groups: dict[str, dict[str, Lease]] = {}
        self.members = 1
        # Every lease of the deployment and its holder, as last read (for the status).
        self.holders: dict[str, str] = {}
        self.rounds = 0  # rounds completed: after one, a lease not held is another's
        self._wake = asyncio.Event()

    def want(self, group: str, key: str) -> Lease:
        leases = self.groups.setdefault(group, {})
        lease = leases.get(key)
        if lease is None:
            lease = leases[key] = Lease(key)
            self._wake.set()
        return lease

    def drop(self, group: str, key: str) -> None:
        """Stop wanting a lease (a firehose left the config): it is no longer renewed,
        and another process may take it after the TTL (a clean stop gives every lease up
        at once: `release_all`)."""
        lease = self.groups.get(group, {}).pop(key, None)
        if lease is not None:
            lease.set_lost()

    async def run(self) -> None:
        """Renew, take and give up leases every third of the TTL, until cancelled."""
        every = self.cluster.config.lease_ttl / 3
        while True:
            raise_if_cancelled()
            self._wake.clear()
            try:
                await self._round()
                self.rounds += 1
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("jetstream.lease_round_failed", error=str(exc) or type(exc).__name__)
            self._expire()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), every)

    def _expire(self) -> None:
        """A lease not renewed for its TTL (the cluster unreachable) may be another's by
        now: stop acting on it. (Every write it guards is fenced as well.)"""
        stale = time.monotonic() - self.cluster.config.lease_ttl
        for leases in self.groups.values():
            for lease in leases.values():
                if lease.held.is_set() and lease.renewed < stale:
                    lease.set_lost()
                    log.warning("jetstream.lease_expired", lease=lease.key)

    async def _round(self) -> None:
        await self._renew_member()
        for leases in list(self.groups.values()):
            share = -(-len(leases) // max(1, self.members))
            held = [lease for lease in leases.values() if lease.held.is_set()]
            for lease in held:
                await self._renew(lease)
            held = [lease for lease in leases.values() if lease.held.is_set()]
            for lease in held[share:]:
                await self._give_up(lease)
            for lease in leases.values():
                if sum(1 for x in leases.values() if x.held.is_set()) >= share:
                    break
                if not lease.held.is_set():
                    await self._take(lease)

    async def _renew_member(self) -> None:
        """Say this process is alive; read who holds what (members among them)."""
        kv, me = self.cluster.leases, self.cluster.me
        await kv.put(f"member.{me}", me.encode())
        found = await self.cluster.entries(self.cluster.names.leases, ">")
        self.holders = {e.key: (e.value or b"").decode() for e in found}
        self.members = max(1, sum(1 for key in self.holders if key.startswith("member.")))

    def status(self) -> dict[str, Any]:
        """Who owns what in the deployment, as this process last read it."""
        holders = self.holders
        return {
            "process": self.cluster.me,
            "connected": self.cluster.connected.is_set(),
            "members": sorted(v for k, v in holders.items() if k.startswith("member.")),
            "partitions": {
                k.removeprefix("part."): v for k, v in holders.items() if k.startswith("part.")
            },
            "cutters": {
                k.removeprefix("cut."): v for k, v in holders.items() if k.startswith("cut.")
            },
            "held_here": sorted(
                lease.key
                for leases in self.groups.values()
                for lease in leases.values()
                if lease.held.is_set()
            ),
        }

    async def _take(self, lease: Lease) -> None:
        kv, me = self.cluster.leases, self.cluster.me.encode()
        with contextlib.suppress(KeyWrongLastSequenceError):  # (someone's: ours from before?)
            lease.set_held(await kv.create(lease.key, me))
            log.info("jetstream.lease_taken", lease=lease.key)
            return
        try:
            entry = await kv.get(lease.key)
        except KeyNotFoundError:
            return  # it went between the two calls: the next round takes it
        if entry.value == me and entry.revision is not None:  # ours, from before a restart
            with contextlib.suppress(KeyWrongLastSequenceError):
                lease.set_held(await kv.update(lease.key, me, last=entry.revision))
                log.info("jetstream.lease_taken", lease=lease.key, again=True)

    async def _renew(self, lease: Lease) -> None:
        kv, me = self.cluster.leases, self.cluster.me.encode()
        try:
            lease.set_held(await kv.update(lease.key, me, last=lease.revision))
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            lease.set_lost()
            log.warning("jetstream.lease_lost", lease=lease.key)

    async def _give_up(self, lease: Lease) -> None:
        revision = lease.revision
        lease.set_lost()
        with contextlib.suppress(nats.errors.Error, KeyWrongLastSequenceError):
            await self.cluster.leases.delete(lease.key, last=revision)
        log.info("jetstream.lease_given_up", lease=lease.key)

    async def release_all(self) -> None:
        """A clean stop: give every lease up so others take over at once."""
        for leases in self.groups.values():
            for lease in leases.values():
                if lease.held.is_set():
                    await self._give_up(lease)
        with contextlib.suppress(nats.errors.Error):
            await self.cluster.leases.delete(f"member.{self.cluster.me}")
