"""Past retry_for a batch is dead-lettered, never dropped; `firehosed replay` brings it back."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.daemon import Daemon, signal_record, wait_until

BROKEN = """
[channels.down]
type = "directory"
path = "{blocker}/export"

[firehoses.files]
account = "acme"
channel = "down"
format = "ndjson"
minutes_between_files = 0.01
retry_for = "1s"
dead_letter = "local"
"""


def broken_daemon(make_daemon, tmp_path: Path) -> tuple[Daemon, str]:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be: every delivery fails")
    extra = BROKEN.format(blocker=blocker)
    return make_daemon(extra), extra


def test_dead_letter_then_replay_into_the_running_daemon(make_daemon, tmp_path) -> None:
    daemon, extra = broken_daemon(make_daemon, tmp_path)
    daemon.start()
    assert daemon.post([signal_record(n) for n in range(5)]).status_code == 202
    event = wait_until(lambda: daemon.events("batch.dead_lettered"))[0]
    assert event["records"] == 5 and "error" in event
    dead = daemon.root / "var" / "dead" / "files"
    assert len(list(dead.glob("*.data"))) == 1
    copies = wait_until(lambda: list((daemon.export / "dead" / "files").glob("*.ndjson")))
    assert copies[0].read_bytes() == next(dead.glob("*.data")).read_bytes()
    metrics = daemon.admin("/metrics").text
    assert 'firehosed_batches_dead_lettered_total{firehose="files"} 1.0' in metrics
    daemon.write_config(extra.replace('channel = "down"', 'channel = "local"'))
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.events("config.reloaded"))
    result = daemon.cli("replay")
    assert result.returncode == 0, result.stderr
    assert "replay files: 1 batches back in delivery" in result.stdout
    wait_until(lambda: len(daemon.delivered("*.ndjson")) == 5)
    assert not list(dead.glob("*.json"))


def test_replay_offline_is_delivered_at_next_start(make_daemon, tmp_path) -> None:
    daemon, extra = broken_daemon(make_daemon, tmp_path)
    daemon.start()
    assert daemon.post([signal_record(n) for n in range(3)]).status_code == 202
    wait_until(lambda: daemon.events("batch.dead_lettered"))
    assert daemon.stop() == 0
    result = daemon.cli("replay")
    assert result.returncode == 0, result.stderr
    assert "delivered at its next start" in result.stdout
    daemon.write_config(extra.replace('channel = "down"', 'channel = "local"'))
    daemon.start()
    wait_until(lambda: len(daemon.delivered("*.ndjson")) == 3)


def test_replay_with_nothing_dead(make_daemon) -> None:
    daemon = make_daemon()
    result = daemon.cli("replay")
    assert result.returncode == 0 and "nothing to replay" in result.stdout
