"""The newcomer's path: start with a directory channel, POST the fixtures, see a file."""

from __future__ import annotations

from tests.daemon import FIXTURES, wait_until


def test_fixture_signals_reach_a_file(make_daemon) -> None:
    daemon = make_daemon(
        """
[firehoses.files]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.01
"""
    ).start()
    body = (FIXTURES / "signals.ndjson").read_bytes()
    response = daemon.post(body, content_type="application/x-ndjson")
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 7, "duplicates": 0, "rejected": []}
    records = wait_until(lambda: len(daemon.delivered()) == 7 and daemon.delivered())
    assert [r["signal_id"]["$oid"][-1] for r in records] == list("1234567")
    assert daemon.stop() == 0
