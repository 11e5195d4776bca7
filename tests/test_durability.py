"""Nothing acknowledged is lost: kill -9 under load, graceful drain, reload with queued data."""

from __future__ import annotations

import signal
import time
from collections import Counter

from tests.daemon import Daemon, signal_record, wait_until
from tests.load import Load

NDJSON_FIREHOSE = """
[firehoses.files]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.01
"""


def delivered_ids(daemon: Daemon) -> Counter[str]:
    return Counter(r["signal_id"]["$oid"] for r in daemon.delivered())


def test_kill_9_under_load_loses_nothing(make_daemon) -> None:
    daemon = make_daemon(NDJSON_FIREHOSE).start()
    with Load(daemon) as load:
        for kill in range(4):
            target = len(load.acked) + 150  # load flows again after every restart
            wait_until(lambda target=target: len(load.acked) >= target, timeout=30)
            if kill < 3:
                daemon.kill()
                daemon.start()
    acked = set(load.acked)
    assert len(acked) >= 600
    assert daemon.stop() == 0
    delivered = delivered_ids(daemon)
    lost = acked - delivered.keys()
    assert not lost, f"{len(lost)} acknowledged records lost"
    assert not list(daemon.export.glob("**/.*.part"))


def test_sigterm_drains_open_batches_and_exits_0(make_daemon) -> None:
    slow = NDJSON_FIREHOSE.replace("minutes_between_files = 0.01", "minutes_between_files = 60")
    daemon = make_daemon(slow).start()
    assert daemon.post([signal_record(n) for n in range(50)]).status_code == 202
    assert daemon.files() == []  # the batch would only be cut in an hour
    assert daemon.stop() == 0
    assert len(delivered_ids(daemon)) == 50
    assert daemon.events("daemon.draining") and daemon.events("daemon.stopped")


def test_queued_records_survive_a_clean_restart_when_the_channel_is_down(
    make_daemon, tmp_path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the export directory should be")
    broken = NDJSON_FIREHOSE + f'\n[channels.down]\ntype = "directory"\npath = "{blocker}/x"\n'
    broken = broken.replace('channel = "local"\nformat', 'channel = "down"\nformat')
    daemon = make_daemon(broken)
    daemon.write_config(broken.replace("drain_timeout", "drain_timeout"))
    daemon.start()
    assert daemon.post([signal_record(n) for n in range(20)]).status_code == 202
    wait_until(lambda: daemon.status()["firehoses"]["files"]["last_error"])
    assert daemon.stop() == 0
    fixed = broken.replace('channel = "down"\nformat', 'channel = "local"\nformat')
    daemon.write_config(fixed)
    daemon.start()
    wait_until(lambda: len(delivered_ids(daemon)) == 20)


def test_sighup_adds_a_firehose_and_keeps_queued_data(make_daemon) -> None:
    paused = NDJSON_FIREHOSE + "paused = true\n"
    daemon = make_daemon(paused).start()
    assert daemon.post([signal_record(n) for n in range(10)]).status_code == 202
    time.sleep(1.0)  # several cut intervals pass: paused holds delivery
    assert delivered_ids(daemon) == Counter()
    daemon.write_config(
        NDJSON_FIREHOSE
        + '\n[firehoses.json_too]\naccount = "acme"\nchannel = "local"\nformat = "json"\n'
        + "minutes_between_files = 0.01\n"
    )
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.events("config.reloaded"))
    wait_until(lambda: len(delivered_ids(daemon)) == 10)
    assert daemon.post([signal_record(n) for n in range(10, 15)]).status_code == 202
    wait_until(lambda: daemon.files("**/*.json"))
    assert set(daemon.status()["firehoses"]) == {"files", "json_too"}


def test_sighup_with_broken_config_keeps_running(make_daemon) -> None:
    daemon = make_daemon(NDJSON_FIREHOSE).start()
    daemon.config_path.write_text(daemon.config_path.read_text() + "\n[server]\nbogus = 1\n")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.events("config.reload_rejected"))
    assert daemon.post([signal_record(1)]).status_code == 202
    wait_until(lambda: len(delivered_ids(daemon)) == 1)


def test_sighup_removing_a_firehose_delivers_its_backlog_first(make_daemon) -> None:
    slow = NDJSON_FIREHOSE.replace("minutes_between_files = 0.01", "minutes_between_files = 60")
    daemon = make_daemon(slow).start()
    assert daemon.post([signal_record(n) for n in range(10)]).status_code == 202
    daemon.write_config(
        '\n[firehoses.other]\naccount = "acme"\nchannel = "local"\nformat = "json"\n'
        "minutes_between_files = 0.01\n"
    )
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.events("firehose.retired"))
    assert len(delivered_ids(daemon)) == 10  # the removed firehose's backlog went out
    assert daemon.post([signal_record(n) for n in range(10, 13)]).status_code == 202
    wait_until(lambda: daemon.files("**/*.json"))
    assert len(delivered_ids(daemon)) == 10  # new signals go only to the firehoses left
    assert set(daemon.status()["firehoses"]) == {"other"}
