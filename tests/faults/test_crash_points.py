"""A crash at each step of a batch's life: restart succeeds, nothing acknowledged is lost,
and a re-sent file has the same name and bytes."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import requests

from tests.daemon import Daemon, signal_record, wait_until
from tests.faults.report import report

FIREHOSE = """
[firehoses.files]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = {minutes}
"""


def crashing(make_daemon, point: str, minutes: float = 0.01) -> Daemon:
    """A daemon that dies like kill -9 when it reaches `point` (small segments)."""
    daemon: Daemon = make_daemon(FIREHOSE.format(minutes=minutes))
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text.replace("[storage]\n", '[storage]\nsegment_size = "1MiB"\n'))
    daemon.start(env={"FIREHOSED_CRASH_AT": point})
    return daemon


def crashed(daemon: Daemon) -> bool:
    assert daemon.proc is not None
    return daemon.proc.poll() == 137


def ids(records: list[dict]) -> Counter[str]:
    return Counter(r["signal_id"]["$oid"] for r in records)


def post_expecting_crash(daemon: Daemon, records: list[dict]) -> None:
    with pytest.raises(requests.ConnectionError):
        daemon.post(records)
    wait_until(lambda: crashed(daemon))


@pytest.mark.parametrize("point", ["ingest.after_append", "ingest.after_fsync"])
def test_crash_before_the_answer_then_the_client_retries(make_daemon, point: str) -> None:
    daemon = crashing(make_daemon, point)
    records = [signal_record(n) for n in range(20)]
    post_expecting_crash(daemon, records)
    daemon.start()
    assert daemon.post(records).status_code == 202  # the client's retry is acknowledged
    wait_until(lambda: set(ids(daemon.delivered())) == set(ids(records)))
    delivered = ids(daemon.delivered())
    # after_fsync: the first copy was durable too; at-least-once means at most 2 copies
    assert max(delivered.values()) <= (2 if point == "ingest.after_fsync" else 1)
    duplicates = sum(delivered.values()) - len(delivered)
    report(f"crash at {point}", acked=len(records), lost=0, duplicates=duplicates)


def batch_files(daemon: Daemon) -> dict[str, tuple[str, bytes]]:
    """Cut batches on disk: manifest name -> (file name, bytes)."""
    found = {}
    for manifest in (daemon.root / "var" / "queues" / "files" / "batches").glob("*.json"):
        name = json.loads(manifest.read_bytes())["name"]
        found[manifest.stem] = (name, manifest.with_suffix(".data").read_bytes())
    return found


@pytest.mark.parametrize("point", ["batch.after_cut", "channel.mid_upload", "batch.after_put"])
def test_crash_around_the_upload_resends_the_same_file(make_daemon, point: str) -> None:
    daemon = crashing(make_daemon, point)
    records = [signal_record(n) for n in range(50)]
    assert daemon.post(records).status_code == 202
    wait_until(lambda: crashed(daemon))
    fixed = batch_files(daemon)
    assert len(fixed) == 1
    ((name, data),) = fixed.values()
    daemon.start()
    # Done re-sending (after batch.after_put the file is already there before it starts).
    wait_until(lambda: daemon.status()["firehoses"]["files"]["batches_pending"] == 0)
    assert [p.name for p in daemon.files()] == [name]
    assert daemon.files()[0].read_bytes() == data
    assert ids(daemon.delivered()) == ids(records)
    assert not list(daemon.export.glob("**/.*.part"))
    report(f"crash at {point}", acked=len(records), lost=0, same_name_and_bytes=True)


def test_crash_while_deleting_segments(make_daemon) -> None:
    daemon = crashing(make_daemon, "queue.mid_segment_delete", minutes=0.05)
    padding = "x" * 600
    sent = []
    for start in range(0, 4000, 1000):
        chunk = [signal_record(n, note=padding) for n in range(start, start + 1000)]
        assert daemon.post(chunk).status_code == 202
        sent += chunk
    wait_until(lambda: crashed(daemon), timeout=30)
    segments = sorted((daemon.root / "var" / "queues" / "files" / "segments").glob("*.seg"))
    assert segments, "some segments were still to be deleted"
    daemon.start()
    wait_until(lambda: sum(ids(daemon.delivered()).values()) >= len(sent), timeout=30)
    assert ids(daemon.delivered()) == ids(sent)


def test_no_part_file_survives_a_mid_upload_crash(make_daemon) -> None:
    daemon = crashing(make_daemon, "channel.mid_upload")
    assert daemon.post([signal_record(n) for n in range(10)]).status_code == 202
    wait_until(lambda: crashed(daemon))
    assert list(daemon.export.glob("**/.*.part"))  # the crash left a half-written part
    daemon.start()
    wait_until(lambda: daemon.status()["firehoses"]["files"]["batches_pending"] == 0)
    assert daemon.files()
    assert not list(daemon.export.glob("**/.*.part"))
