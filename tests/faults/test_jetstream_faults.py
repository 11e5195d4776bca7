"""Scale-out faults: firehosed processes and NATS servers killed under load.

Two `firehosed run` processes share a real three-server JetStream cluster (R3); four
threads post to them in turn. Two firehoses of the account take the same records in
the same format, each into an export directory of its own (so the processes share
two cutters, and the QUEUES stream is sent the same bytes on two subjects). Each
scenario counts from the client's side, over both firehoses: `lost` is acknowledged
ids never delivered (must be 0); `duplicates` is ids delivered in more than one file
(a batch sent again after a takeover keeps its name and bytes, so it overwrites
itself and is not counted).

Short form: 3 process kills, one server kill, one cluster restart. Full form
(`tests/faults/run --full`): 20 process kills and 5 server kills.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.daemon import Daemon, wait_until
from tests.deployment import Deployment
from tests.faults.report import full, report
from tests.load import Load
from tests.servers.nats import NatsCluster


def delivered(deployment: Deployment) -> list[Counter[str]]:
    """How many files each id was delivered in, per firehose."""
    return [deployment.delivered_ids(export) for export in deployment.exports]


def settle(
    scenario: str, deployment: Deployment, load: Load, daemons: list[Daemon], **figures: object
) -> None:
    """Wait for every acknowledged id, stop the daemons, report; none may be lost."""
    acked = set(load.acked)
    wait_until(lambda: all(acked <= got.keys() for got in delivered(deployment)), timeout=180)
    for daemon in daemons:
        assert daemon.stop(timeout=120) == 0
    each = delivered(deployment)
    lost = sum(len(acked - got.keys()) for got in each)
    duplicates = sum(count - 1 for got in each for count in got.values() if count > 1)
    report(
        scenario,
        **figures,
        firehoses=len(each),
        acked=len(acked),
        lost=lost,
        duplicates=duplicates,
        refused=len(load.failures),
    )
    assert lost == 0, f"{lost} acknowledged signals lost"


@pytest.mark.timeout(600)  # (kills, restarts and a drain of both: slow on a loaded machine)
def test_kill_9_one_of_two_processes_again_and_again(
    tmp_path: Path, own_nats_cluster: NatsCluster
) -> None:
    kills, interval = (20, (2.0, 8.0)) if full() else (3, (1.0, 3.0))
    deployment = Deployment(tmp_path, own_nats_cluster, copy=True)
    try:
        daemons = [deployment.daemon("a").start(), deployment.daemon("b").start()]
        rng = random.Random(20261205)
        with Load(daemons, threads=4, per_request=10) as load:
            for _ in range(kills):
                time.sleep(rng.uniform(*interval))
                victim = rng.choice(daemons)
                victim.kill()
                # Back at once, or after the lease TTL (2 s): then the other process
                # has taken its partitions and cutters over.
                time.sleep(rng.choice([0.0, 3.0]))
                victim.start()
            wait_until(lambda: len(load.acked) > 2000, timeout=120)
        settle("jetstream_kill_9_firehosed", deployment, load, daemons, kills=kills)
    finally:
        deployment.close()


@pytest.mark.timeout(600)
def test_kill_9_one_nats_server_of_three_under_load(
    tmp_path: Path, own_nats_cluster: NatsCluster
) -> None:
    kills = 5 if full() else 1
    deployment = Deployment(tmp_path, own_nats_cluster, copy=True)
    try:
        daemons = [deployment.daemon("a").start(), deployment.daemon("b").start()]
        rng = random.Random(5)
        with Load(daemons, threads=4, per_request=10) as load:
            for _ in range(kills):
                wait_until(lambda: len(load.acked) > 500)
                server = rng.choice(own_nats_cluster.servers)
                server.kill()
                target = len(load.acked) + 1000
                wait_until(lambda t=target: len(load.acked) > t, timeout=60)  # it goes on
                server.start()
                time.sleep(2.0)
        settle("jetstream_kill_9_nats_server", deployment, load, daemons, kills=kills)
    finally:
        deployment.close()


@pytest.mark.timeout(600)
def test_restart_the_whole_cluster_under_load(
    tmp_path: Path, own_nats_cluster: NatsCluster
) -> None:
    deployment = Deployment(tmp_path, own_nats_cluster, copy=True)
    try:
        daemons = [deployment.daemon("a").start(), deployment.daemon("b").start()]
        with Load(daemons, threads=4, per_request=10) as load:
            wait_until(lambda: len(load.acked) > 1000, timeout=60)
            own_nats_cluster.stop()
            time.sleep(3.0)  # past the lease TTL: every lease is given up
            own_nats_cluster.start()
            before = len(load.acked)
            wait_until(lambda: len(load.acked) > before + 1000, timeout=120)
        settle("jetstream_cluster_restart", deployment, load, daemons)
    finally:
        deployment.close()
