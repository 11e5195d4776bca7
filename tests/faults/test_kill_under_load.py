"""kill -9 at random intervals under sustained load, and SIGHUP under load.

Short form (default): 3 kills at random 0.3-1 s intervals, and at least 50k signals.
Full form (`tests/faults/run --full`): 20 kills at random 1-30 s intervals, and at least
1M signals. Either way the load runs until the last kill has landed.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter

from tests.daemon import Daemon, wait_until
from tests.faults.report import full, report
from tests.load import Load

FIREHOSE = """
[firehoses.files]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.02
"""


def delivered(daemon: Daemon) -> Counter[str]:
    return Counter(r["signal_id"]["$oid"] for r in daemon.delivered())


def test_random_kill_9_under_sustained_load(make_daemon) -> None:
    # The full form's 20 kills at 1-30 s take ~5 min: its load is paced to last that long.
    if full():
        signals, kills, interval, threads, per_request = 1_000_000, 20, (1, 30), 1, 8
    else:
        signals, kills, interval, threads, per_request = 50_000, 3, (0.3, 1.0), 4, 20
    daemon = make_daemon(FIREHOSE).start()
    rng = random.Random(20261123)
    restarts = []
    # The load runs until every kill has landed and at least `signals` were sent, so
    # that a fast machine cannot finish the load before the last kill.
    with Load(daemon, threads=threads, per_request=per_request) as load:
        for _ in range(kills):
            time.sleep(rng.uniform(*interval))
            daemon.kill()
            started = time.monotonic()
            daemon.start()
            restarts.append(time.monotonic() - started)
        wait_until(lambda: load.next_id >= signals, timeout=600)
    acked = set(load.acked)
    assert daemon.stop(timeout=120) == 0
    got = delivered(daemon)
    lost = acked - got.keys()
    duplicates = sum(c - 1 for c in got.values() if c > 1)
    report(
        "kill_9_under_load",
        signals=signals,
        kills=len(restarts),
        acked=len(acked),
        lost=len(lost),
        duplicates=duplicates,
        max_restart_to_ready_s=round(max(restarts), 2),
    )
    assert not lost, f"{len(lost)} acknowledged signals lost"
    assert len(acked) > signals * 0.5  # the load really ran through the kills


def test_sighup_under_load_fails_no_request(make_daemon) -> None:
    daemon = make_daemon(FIREHOSE).start()
    with Load(daemon, threads=4, per_request=20) as load:
        wait_until(lambda: len(load.acked) > 500)
        daemon.write_config(
            FIREHOSE + '\n[firehoses.more]\naccount = "acme"\nchannel = "local"\nformat = "json"\n'
        )
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: daemon.events("config.reloaded"))
        target = len(load.acked) + 500
        wait_until(lambda: len(load.acked) > target)
        daemon.config_path.write_text("this is not TOML [")
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: daemon.events("config.reload_rejected"))
        target = len(load.acked) + 500
        wait_until(lambda: len(load.acked) > target)
    report("sighup_under_load", requests_failed=len(load.failures), acked=len(load.acked))
    assert load.failures == []
    assert set(daemon.status()["firehoses"]) == {
        "files",
        "more",
    }  # the invalid file changed nothing
    wait_until(lambda: delivered(daemon).keys() >= load.acked, timeout=60)
