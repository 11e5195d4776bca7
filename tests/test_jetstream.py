"""Scale-out on NATS JetStream: firehosed processes sharing one real three-server cluster.

Each test is a deployment of its own (`[jetstream] prefix`) on the session's cluster,
with daemons that are real `firehosed run` processes, and counts from the client's side:
every id acknowledged with a 202 is delivered, once, whichever process took it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import requests
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import APIError, ObjectNotFoundError
from structlog.testing import capture_logs

from firehosed.alerts import Alerts
from firehosed.channels import open_channel
from firehosed.channels.directory import DirectoryConfig
from firehosed.config import AlertsConfig, FirehoseConfig, JetStreamConfig
from firehosed.delivery import Worker
from firehosed.errors import BatchGone, NotHere
from firehosed.firehose import Firehose
from firehosed.jetstream import cluster as cluster_module
from firehosed.jetstream.cluster import Cluster, ClusterError
from firehosed.jetstream.queue import JetStreamBackend
from firehosed.queue.base import Manifest, Queue
from firehosed.units import Duration
from tests.daemon import signal_record, wait_until
from tests.deployment import Deployment
from tests.servers.nats import NatsCluster
from tests.test_dead_letter import BROKEN
from tests.test_queue_contract import FILES, commit, encoder, numbers, read


@pytest.fixture
def deployment(tmp_path: Path, nats_cluster: NatsCluster) -> Iterator[Deployment]:
    made = Deployment(tmp_path, nats_cluster)
    yield made
    made.close()


def test_two_processes_deliver_every_acknowledged_signal_once(deployment: Deployment) -> None:
    first, second = deployment.daemon("a").start(), deployment.daemon("b").start()
    acknowledged = []
    for n in range(200):
        daemon = first if n % 2 else second
        answer = daemon.post([signal_record(n, session=f"s{n % 17}", person=f"p{n % 17}")])
        assert answer.status_code == 202, answer.text
        acknowledged.append(f"{n:024x}")
    batch = [signal_record(n, session=f"s{n % 5}", person="px") for n in range(200, 700)]
    answer = first.post(batch)
    assert answer.status_code == 202 and answer.json()["accepted"] == 500
    acknowledged += [f"{n:024x}" for n in range(200, 700)]
    wait_until(lambda: set(deployment.delivered_ids()) >= set(acknowledged), timeout=60)
    counts = deployment.delivered_ids()
    assert sorted(counts) == sorted(acknowledged)
    assert set(counts.values()) == {1}
    names = [p.name for p in deployment.export.rglob("*.ndjson")]
    assert len(names) == len(set(names))


def test_a_retried_request_is_stored_once_whichever_process_takes_it(
    deployment: Deployment,
) -> None:
    first, second = deployment.daemon("a").start(), deployment.daemon("b").start()
    body = [signal_record(n, session="s1", person="p1") for n in range(20)]
    assert first.post(body).status_code == 202
    assert second.post(body).status_code == 202  # the client timed out and retried there
    wait_until(lambda: len(deployment.delivered_ids()) == 20, timeout=60)
    deployment.daemons[0].stop()
    deployment.daemons[1].stop()
    assert set(deployment.delivered_ids().values()) == {1}


def test_catch_up_survives_the_death_of_the_process_that_held_the_ring(
    deployment: Deployment,
) -> None:
    first = deployment.daemon("a").start()
    for n in range(3):
        assert first.post([signal_record(n, session="visit")]).status_code == 202
    wait_until(lambda: len(deployment.delivered_ids()) == 3, timeout=60)
    first.kill()  # kill -9: its rings are gone with it
    second = deployment.daemon("b").start()
    assert second.post([signal_record(9, session="visit", person="ann")]).status_code == 202

    def replayed() -> list[dict[str, object]]:
        return [r for r in deployment.delivered() if r.get("catch_up")]

    copies = wait_until(lambda: len(replayed()) == 3 and replayed(), timeout=60)
    assert {r["pid"] for r in copies} == {"ann"}
    assert sorted(str(r["signal_id"]["$oid"]) for r in copies) == [  # type: ignore[index]
        f"{n:024x}" for n in range(3)
    ]


def test_firehosed_replay_is_answered_by_the_process_that_cuts_the_firehose(
    tmp_path: Path, deployment: Deployment
) -> None:
    """The dead letters are in the cluster, not in the storage dir of the process
    that made them: `firehosed replay` asks the process running beside it, which
    replays the firehoses it cuts and says who cuts the others."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be: every delivery fails")
    extra = BROKEN.format(blocker=blocker)
    first = deployment.daemon("a", extra)
    alone = first.cli("replay")  # (not running: no process here to ask)
    assert alone.returncode == 1
    assert "in a JetStream deployment a running process replays" in alone.stderr
    first.start()
    assert (
        first.post([signal_record(n, session="s", person="p") for n in range(3)]).status_code == 202
    )
    wait_until(lambda: first.events("batch.dead_lettered"), timeout=60)
    second = deployment.daemon("b", extra).start()

    def settled() -> dict[str, str]:  # (two cutters, one each: a fair share)
        cutters: dict[str, str] = second.status()["cluster"]["cutters"]
        return cutters if len(set(cutters.values())) == 2 else {}

    cutter = wait_until(settled, timeout=30)["files"]
    ids = {(d.root / "var" / "jetstream-id").read_text().strip(): d for d in (first, second)}
    [(other_id, other)] = [(i, d) for i, d in ids.items() if i != cutter]
    refused = other.cli("replay")
    assert refused.returncode == 1
    assert "replay all: 0 batches back in delivery" in refused.stdout
    assert (
        f"replay files: FAILED: firehose files is cut by process {cutter},"
        f" not by this one ({other_id}): ask that one to replay"
    ) in refused.stderr
    blocker.unlink()
    answered = ids[cutter].cli("replay", "--firehose", "files")
    assert answered.returncode == 0, answered.stderr
    assert "replay files: 1 batches back in delivery" in answered.stdout
    export = blocker / "export"
    delivered = wait_until(lambda: list(export.rglob("*.ndjson")), timeout=60)
    assert sorted(
        json.loads(line)["signal_id"]["$oid"] for line in delivered[0].read_text().splitlines()
    ) == [f"{n:024x}" for n in range(3)]


def test_an_unreachable_cluster_gets_503_never_202_and_delivery_resumes(
    tmp_path: Path, own_nats_cluster: NatsCluster
) -> None:
    deployment = Deployment(tmp_path, own_nats_cluster)
    try:
        daemon = deployment.daemon("a").start()
        assert daemon.post([signal_record(1, session="s")]).status_code == 202
        own_nats_cluster.stop()
        acknowledged, attempts = {f"{1:024x}"}, itertools.count(100)

        def refused() -> list[requests.Response]:
            n = next(attempts)
            answer = daemon.post([signal_record(n)])
            if answer.status_code == 202:  # (taken before the servers went)
                acknowledged.add(f"{n:024x}")
                return []
            return [answer]  # (a Response is falsy when it is not 2xx)

        [answer] = wait_until(refused)
        assert answer.status_code == 503
        assert answer.headers["Retry-After"]
        assert "JetStream" in answer.json()["error"]
        own_nats_cluster.start()
        wait_until(lambda: daemon.post([signal_record(3)]).status_code == 202, timeout=60)
        acknowledged.add(f"{3:024x}")
        wait_until(lambda: acknowledged <= set(deployment.delivered_ids()), timeout=60)
    finally:
        deployment.close()


def test_check_connect_reaches_the_cluster_and_sets_up_its_streams(
    deployment: Deployment,
) -> None:
    result = deployment.daemon("a").cli("check", "--connect")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "jetstream: ok" in result.stdout
    assert "_SIGNALS: 3 replicas, 3 up" in result.stdout


@pytest.mark.parametrize("sync", [True, False])
async def test_one_replica_needs_servers_that_sync_every_write(tmp_path: Path, sync: bool) -> None:
    server = NatsCluster(tmp_path / "nats", size=1, sync=sync)
    server.start()
    try:
        await server.wait_ready()
        deployment = Deployment(tmp_path, server)
        deployment.base = deployment.base.replace(
            "partitions = 4",
            f"partitions = 4\nreplicas = 1\nmonitor = {json.dumps(server.monitors)}",
        )
        result = deployment.daemon("a").cli("check", "--connect")
        if sync:
            assert result.returncode == 0, result.stdout
            assert "_SIGNALS: 1 replicas" in result.stdout
        else:
            assert result.returncode == 1
            assert "server n1 syncs only every 120 s: a 202 would not mean kept" in result.stdout
    finally:
        server.stop()


def test_one_replica_without_monitoring_urls_is_a_config_error(deployment: Deployment) -> None:
    deployment.base = deployment.base.replace("partitions = 4", "partitions = 4\nreplicas = 1")
    daemon = deployment.daemon("a")
    result = daemon.cli("check")
    assert result.returncode != 0
    line = daemon.config_path.read_text().splitlines().index("replicas = 1") + 1
    assert f"{daemon.config_path}:{line}: jetstream.replicas: 1 replica is safe only" in (
        result.stderr + result.stdout
    )


def test_status_shows_which_process_owns_what(deployment: Deployment) -> None:
    first = deployment.daemon("a").start()
    deployment.daemon("b").start()

    def shared() -> dict[str, object]:
        cluster = first.status()["cluster"]
        owners = set(cluster["partitions"].values())
        return cluster if len(cluster["members"]) == 2 and len(owners) == 2 else {}

    cluster = wait_until(shared, timeout=30)
    assert sorted(cluster["partitions"]) == ["0", "1", "2", "3"]  # type: ignore[call-overload]
    assert set(cluster["cutters"]) == {"all"}  # type: ignore[call-overload]
    mine = [k for k in cluster["held_here"] if k.startswith("part.")]  # type: ignore[attr-defined]
    assert len(mine) == 2  # a fair share: half of four
    page = first.admin("/").text
    assert "2 processes, this one connected" in page and "(this process)" in page
    metrics = first.admin("/metrics").text
    assert "firehosed_jetstream_partitions_owned 2.0" in metrics
    assert "firehosed_jetstream_members 2.0" in metrics
    status = first.cli("status")
    assert "cluster: 2 processes" in status.stdout and "owns 2 of 4 partitions" in status.stdout


def test_a_killed_process_leases_move_within_the_ttl_and_its_work_goes_on(
    deployment: Deployment,
) -> None:
    first, second = deployment.daemon("a").start(), deployment.daemon("b").start()
    wait_until(lambda: len(set(second.status()["cluster"]["partitions"].values())) == 2)
    for n in range(40):
        assert first.post([signal_record(n, session=f"s{n}", person="p")]).status_code == 202
    first.kill()
    killed = time.monotonic()
    me = second.status()["cluster"]["process"]

    def everything_moved() -> bool:
        cluster = second.status()["cluster"]
        return set(cluster["partitions"].values()) == {me} and cluster["cutters"] == {"all": me}

    wait_until(everything_moved, timeout=30)
    moved = time.monotonic() - killed
    assert moved < 2 * 2.0 + 2.0  # lease_ttl 2 s: gone after it, taken at the next round
    for n in range(40, 60):
        assert second.post([signal_record(n, session=f"s{n}", person="p")]).status_code == 202
    wait_until(lambda: len(deployment.delivered_ids()) == 60, timeout=60)


async def test_setting_up_streams_waits_while_the_cluster_cannot_place_them(
    tmp_path: Path, nats_cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster starting, or loaded, may answer for a moment that it has no peers for a
    stream's replicas (JetStream error 10005). No real server does that on cue, so the
    first tries are refused here as it would refuse them; the real setup follows."""
    real = Cluster._set_up
    refusals = iter(range(2))

    async def refusing(self: Cluster) -> None:
        if next(refusals, None) is not None:
            raise APIError(code=400, err_code=10005, description="no suitable peers")
        await real(self)

    monkeypatch.setattr(Cluster, "_set_up", refusing)
    config = JetStreamConfig(servers=nats_cluster.urls, prefix="patience", lease_ttl=Duration(3.0))
    patient = Cluster(config, "p1")
    try:
        await patient.connect()
        assert next(refusals, None) is None  # both refusals were met, then it set up
        assert patient.js is not None
        stream = await patient.js.stream_info(patient.names.signals)
        assert stream.config.num_replicas == 3
    finally:
        await patient.close()

    # A refusal that goes on past SETUP_PATIENCE is an error naming it.
    monkeypatch.setattr(cluster_module, "SETUP_PATIENCE", 1.0)
    refusals = iter(range(1_000))
    impatient = Cluster(config, "p2")
    started = time.monotonic()
    try:
        with pytest.raises(ClusterError, match="no suitable peers"):
            await impatient.connect()
    finally:
        await impatient.close()
    assert time.monotonic() - started < 5


@contextlib.asynccontextmanager
async def holder_and_other(
    root: Path, cluster: NatsCluster, prefix: str
) -> AsyncIterator[tuple[Queue, Manifest, JetStreamBackend]]:
    """Two processes of one deployment: "holder", whose leases run, has cut batch 1
    (records 0-2) of firehose fh; "other" has not run its leases. Holder's queue,
    batch 1, and other's backend."""
    config = JetStreamConfig(servers=cluster.urls, prefix=prefix, lease_ttl=Duration(3.0))
    holder = JetStreamBackend(Cluster(config, "holder"), root / "holder")
    other = JetStreamBackend(Cluster(config, "other"), root / "other")
    leases = asyncio.create_task(holder.run())
    try:
        queue = await holder.open_queue("fh")
        queue.configure(FILES, encoder)
        await commit(queue, range(3))
        first = await asyncio.wait_for(queue.next_batch(flush=True), 30)
        assert first is not None
        yield queue, first, other
    finally:
        leases.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leases
        await holder.close()
        await other.close()


@contextlib.asynccontextmanager
async def batch_retired_elsewhere(
    root: Path, cluster: NatsCluster, prefix: str
) -> AsyncIterator[tuple[Queue, Manifest]]:
    """The holder's queue with records 3-4 committed after batch 1, and batch 1 then
    delivered and retired by the other process (`done` asks for no lease), as a
    process whose cut lease lapsed may do: the queue, and batch 1."""
    async with holder_and_other(root, cluster, prefix) as (queue, first, other):
        await commit(queue, range(3, 5))
        elsewhere = await other.open_queue("fh")
        elsewhere.configure(FILES, encoder)
        await elsewhere.done(first)
        yield queue, first


async def test_a_batch_another_process_retired_meanwhile_is_dropped_and_the_state_read_again(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    """A process whose cut lease lapsed (a NATS server killed under it) may still
    deliver the batch it cut, and retire it (records purged, manifest and bytes
    deleted), after the process that took the lease over read the manifests. The new
    holder drops that batch and reads the state again; it had retried the batch, whose
    bytes were gone, for ever, holding every later record back (seen once in CI)."""
    async with batch_retired_elsewhere(tmp_path, nats_cluster, "retired") as (queue, first):
        with pytest.raises(BatchGone):
            await queue.local_file(first, write=True)
        after = await asyncio.wait_for(queue.next_batch(flush=True), 30)
        assert after is not None and after.no == first.no + 1
        assert numbers(await read(queue, after)) == [3, 4]


async def test_a_worker_drops_a_batch_retired_elsewhere_and_delivers_the_next(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    """The delivery side of the test above: a worker whose batch another process
    delivered and retired meanwhile logs `batch.gone` and goes on to the next batch,
    where it had retried the vanished one for ever."""
    out = tmp_path / "out"
    async with batch_retired_elsewhere(tmp_path, nats_cluster, "gone") as (queue, first):
        firehose_config = FirehoseConfig(
            account="acme", channel="out", format="ndjson", minutes_between_files=0.02
        )
        firehose = Firehose("fh", firehose_config, queue, None)
        channel = open_channel("out", DirectoryConfig(path=str(out)))
        worker = Worker(firehose, channel, None, Alerts(AlertsConfig()))
        with capture_logs() as logs:
            running = asyncio.create_task(worker.run())
            try:
                delivered = await delivered_files(worker, out, 30)
            finally:
                worker.stop()
                await asyncio.wait_for(running, 30)
        assert [numbers(path.read_bytes()) for path in delivered] == [[3, 4]]
        gone = [entry for entry in logs if entry["event"] == "batch.gone"]
        assert [entry["batch"] for entry in gone] == [first.name]
        assert worker.failing is None


async def delivered_files(worker: Worker, root: Path, seconds: float) -> list[Path]:
    """The files under `root` once `worker` says it delivered a batch (polled)."""
    deadline = time.monotonic() + seconds
    while worker.last_delivery is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing delivered within {seconds} s")
        await asyncio.sleep(0.1)
    return await asyncio.to_thread(lambda: sorted(p for p in root.rglob("*") if p.is_file()))


@contextlib.contextmanager
def watch_answered_before_its_entries() -> Iterator[list[bytes]]:
    """Make certain what a busy client or cluster does now and then: a KV watch's
    consumer is asked what it has pending only once the server has sent it the entries
    (so: nothing), and the client reads those entries only after that answer. Yields
    the subjects so held back."""
    process = Client._process_msg
    info = JetStreamContext.PushSubscription.consumer_info
    sent, answered = asyncio.Event(), asyncio.Event()
    held: list[tuple[Any, ...]] = []
    subjects: list[bytes] = []
    drains: list[asyncio.Task[None]] = []

    async def drain() -> None:
        await answered.wait()
        while held:  # (in order: the watch's ordered consumer checks it)
            await process(*held.pop(0))

    async def process_msg(client: Client, sid: int, subject: bytes, *rest: Any) -> None:
        if subject.startswith(b"$KV.") and (held or not answered.is_set()):
            held.append((client, sid, subject, *rest))
            subjects.append(subject)
            sent.set()
            if not drains or drains[-1].done():
                drains.append(asyncio.ensure_future(drain()))
            return
        await process(client, sid, subject, *rest)

    async def consumer_info(subscription: Any) -> Any:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sent.wait(), 2)
        try:
            return await info(subscription)
        finally:
            answered.set()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Client, "_process_msg", process_msg)
        patch.setattr(JetStreamContext.PushSubscription, "consumer_info", consumer_info)
        yield subjects


async def test_a_key_listing_waits_for_entries_still_on_their_way_when_the_watch_began(
    nats_cluster: NatsCluster,
) -> None:
    """nats-py marks a new watch "up to date" before its entries when its consumer had
    sent them all by the time nats-py asked it what was pending. Trusting that marker,
    a cutter that took a firehose over could start without the batches already cut, and
    a replay found no dead-lettered batch (seen once in CI)."""
    config = JetStreamConfig(servers=nats_cluster.urls, prefix="listing")
    cluster = Cluster(config, "lister")
    await cluster.connect()
    try:
        state = cluster.names.state
        for key in ("fh.d.1", "fh.d.2", "fh.d.3", "fh.m.4", "other.d.1"):
            await cluster.state.put(key, key.encode())
        await cluster.state.delete("fh.d.2")
        with watch_answered_before_its_entries() as held:
            found = await cluster.entries(state, "fh.d.*")
        assert held  # (the entries did come after the answer)
        assert sorted((e.key, e.value) for e in found) == [
            ("fh.d.1", b"fh.d.1"),
            ("fh.d.3", b"fh.d.3"),
        ]
        with watch_answered_before_its_entries():
            assert await cluster.entries(state, "none.d.*") == []
        await cluster.state.delete("fh.d.1")
        await cluster.state.delete("fh.d.3")
        assert await cluster.entries(state, "fh.d.*") == []
    finally:
        await cluster.close()


async def test_a_key_listing_whose_watch_never_delivers_gives_up_as_the_cluster_not_answering(
    nats_cluster: NatsCluster,
) -> None:
    """A watch whose consumer is gone (with its server) delivers nothing more: the
    listing gives up after three quiet timeouts, as any unanswered request does (a
    cutter loading its state, or a lease round, tries again), where it waited for ever."""
    config = JetStreamConfig(servers=nats_cluster.urls, prefix="quiet", timeout=Duration(0.5))
    cluster = Cluster(config, "lister")
    await cluster.connect()
    process = Client._process_msg

    async def dropping(client: Client, sid: int, subject: bytes, *rest: Any) -> None:
        if not subject.startswith(b"$KV."):
            await process(client, sid, subject, *rest)

    try:
        await cluster.state.put("fh.d.1", b"one")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Client, "_process_msg", dropping)
            started = time.monotonic()
            with pytest.raises(nats.errors.TimeoutError):
                await asyncio.wait_for(cluster.entries(cluster.names.state, "fh.d.*"), 30)
            assert time.monotonic() - started < 10
    finally:
        await cluster.close()


async def test_replay_asked_of_a_process_that_does_not_cut_the_firehose_says_which_does(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    """A firehose's dead letters are replayed by its cutter. Another process waits one
    lease TTL for the lease, then says who holds it; it had waited for ever (a worker's
    replay) or replayed nothing and said nothing (a queue interrupted meanwhile)."""
    async with holder_and_other(tmp_path, nats_cluster, "replayhere") as (queue, batch, other):
        await queue.dead_letter(batch)
        leases = asyncio.create_task(other.run())
        try:
            elsewhere = await other.open_queue("fh")
            elsewhere.configure(FILES, encoder)
            started = time.monotonic()
            with pytest.raises(NotHere, match=r"cut by process holder, not by this one \(other\)"):
                await asyncio.wait_for(replayed(elsewhere), 30)
            assert time.monotonic() - started < 6  # (one lease TTL, 3 s, and a little)
        finally:
            leases.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leases
        assert [b.records for b in await asyncio.wait_for(replayed(queue), 30)] == [3]
        again = await asyncio.wait_for(queue.next_batch(flush=True), 30)
        assert again is not None and numbers(await read(queue, again)) == [0, 1, 2]


async def replayed(queue: Queue) -> list[Manifest]:
    return [batch async for batch in queue.replay()]


async def test_a_cutter_that_lost_its_lease_mid_cut_leaves_the_new_cutters_bytes_alone(
    tmp_path: Path, nats_cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder of fh's cut lease has read and encoded batch 1 (records 0-2) when it
    gives the lease up (a process joined: fair shares); the new holder cuts its own
    batch 1 (records 0-4) and fixes it first. The old holder's bytes, put before its
    manifest is refused, had replaced the new holder's under the same name: batch 1
    was then delivered as records 0-2, and 3-4 were lost (the full fault form, with two
    firehoses, saw 716 records lost so)."""
    config = JetStreamConfig(servers=nats_cluster.urls, prefix="midcut", lease_ttl=Duration(3.0))
    old = JetStreamBackend(Cluster(config, "old"), tmp_path / "old")
    new = JetStreamBackend(Cluster(config, "new"), tmp_path / "new")
    leases = [asyncio.create_task(old.run())]
    try:
        stale = await old.open_queue("fh")
        stale.configure(FILES, encoder)
        refused: list[Manifest] = []
        holding, fixed, go_on = asyncio.Event(), asyncio.Event(), asyncio.Event()
        fix = stale._fix  # type: ignore[attr-defined]

        async def held_fix(manifest: Manifest, data: bytes) -> bool:
            holding.set()
            await go_on.wait()
            try:
                kept: bool = await fix(manifest, data)
                if not kept:
                    refused.append(manifest)
                return kept
            finally:
                fixed.set()

        monkeypatch.setattr(stale, "_fix", held_fix)
        await commit(stale, range(3))
        cutting = asyncio.create_task(stale.next_batch(flush=True))
        await asyncio.wait_for(holding.wait(), 30)
        await commit(stale, range(3, 5))
        leases[0].cancel()
        await asyncio.gather(leases[0], return_exceptions=True)
        await old.leases.release_all()
        leases.append(asyncio.create_task(new.run()))
        queue = await new.open_queue("fh")
        queue.configure(FILES, encoder)
        batch = await asyncio.wait_for(queue.next_batch(flush=True), 30)
        assert batch is not None and batch.no == 1 and batch.records == 5
        go_on.set()
        await asyncio.wait_for(fixed.wait(), 30)
        assert [m.no for m in refused] == [1]  # (the old holder's cut was refused)
        cutting.cancel()
        assert numbers(await read(queue, batch)) == [0, 1, 2, 3, 4]
        with pytest.raises(ObjectNotFoundError):  # (its bytes did not stay behind)
            await new.cluster.objects.get(f"fh/1-{refused[0].id}")
    finally:
        for task in leases:
            task.cancel()
        await asyncio.gather(*leases, return_exceptions=True)
        await old.close()
        await new.close()


async def test_bytes_a_version_before_named_by_batch_number_alone_are_read_and_removed(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    """A deployment upgraded with batches cut: their bytes are under `<firehose>/<no>`."""
    async with holder_and_other(tmp_path, nats_cluster, "legacy") as (queue, first, other):
        await other.connect()
        objects = other.cluster.objects
        data = (await objects.get(f"fh/1-{first.id}")).data
        await objects.put("fh/1", data)
        await objects.delete(f"fh/1-{first.id}")
        assert data and await read(queue, first) == data
        await queue.done(first)
        with pytest.raises(ObjectNotFoundError):
            await objects.get("fh/1")


async def test_a_cutter_whose_lease_went_and_came_back_unseen_reads_its_state_again(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    """Process a has read fh's state (records 0-2 pending) when its lease lapses
    unseen (the cluster did not answer its renewals; a was waiting to cut); b takes the
    lease, cuts and delivers 0-2, and gives the lease back. a cut from what it had read:
    the records b purged were gone, and that cut failed for ever ("read 7580 of the
    batch's 8220 records", in a CI run of the fault suite)."""
    config = JetStreamConfig(servers=nats_cluster.urls, prefix="comeback", lease_ttl=Duration(3.0))
    a = JetStreamBackend(Cluster(config, "a"), tmp_path / "a")
    b = JetStreamBackend(Cluster(config, "b"), tmp_path / "b")
    leases = asyncio.create_task(a.run())
    keeping: asyncio.Task[None] | None = None
    try:
        queue = await a.open_queue("fh")
        queue.configure(FILES, encoder)
        await commit(queue, range(3))
        keeping = asyncio.create_task(queue.keep())  # (reads the state; cuts in an hour)
        deadline = time.monotonic() + 30
        while queue.figures(time.time()).records != 3:
            assert time.monotonic() < deadline, "a never read fh's state"
            await asyncio.sleep(0.05)
        leases.cancel()
        await asyncio.gather(leases, return_exceptions=True)
        await a.leases.release_all()  # (the lease lapses; `keep` waits on, unaware)
        other = await b.open_queue("fh")  # (wanting the lease before b's first round)
        other.configure(FILES, encoder)
        leases = asyncio.create_task(b.run())
        cut = await asyncio.wait_for(other.next_batch(flush=True), 30)
        assert cut is not None and numbers(await read(other, cut)) == [0, 1, 2]
        await other.done(cut)
        leases.cancel()
        await asyncio.gather(leases, return_exceptions=True)
        await b.leases.release_all()
        leases = asyncio.create_task(a.run())
        await asyncio.wait_for(a.leases.want("cut", "cut.fh").held.wait(), 30)  # (back)
        keeping.cancel()
        await commit(queue, range(3, 5))
        batch = await asyncio.wait_for(queue.next_batch(flush=True), 30)
        assert batch is not None and numbers(await read(queue, batch)) == [3, 4]
    finally:
        for task in (leases, keeping):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (leases, keeping) if t), return_exceptions=True)
        await a.close()
        await b.close()
