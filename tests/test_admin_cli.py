"""The operators' commands against a real daemon: `status`, `pause`, `resume` and
`config set` (edits keep the file byte for byte outside the changed line)."""

from __future__ import annotations

import json

from tests.daemon import signal_record, wait_until

COMMENTED = """
# Firehoses, commented as people do.
[firehoses.files]   # the nightly export
account = "acme"    # whose signals
channel = "local"
format = "ndjson"
minutes_between_files = 0.01  # 0.6 s
paused = false      # flip with `firehosed pause files`

# another one, to be left alone
[firehoses.other]
account = "acme"
channel = "local"
format = "ndjson"
types = ["never"]   # nothing reaches it
"""


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    """(old, new) for each line that differs; the texts must have as many lines."""
    old, new = before.splitlines(keepends=True), after.splitlines(keepends=True)
    assert len(old) == len(new)
    return [(a, b) for a, b in zip(old, new, strict=True) if a != b]


def test_pause_then_resume_keeps_the_file_and_really_stops_delivery(make_daemon) -> None:
    daemon = make_daemon(COMMENTED).start()
    original = daemon.config_path.read_text()

    paused = daemon.cli("pause", "files")
    assert paused.returncode == 0, paused.stdout + paused.stderr
    assert "reloaded" in paused.stdout
    after = daemon.config_path.read_text()
    assert changed_lines(original, after) == [
        (
            "paused = false      # flip with `firehosed pause files`\n",
            "paused = true      # flip with `firehosed pause files`\n",
        )
    ]
    assert daemon.status()["firehoses"]["files"]["paused"] is True

    assert daemon.post([signal_record(n) for n in range(3)]).status_code == 202
    # Staged for longer than several cut intervals, and still nothing delivered.
    wait_until(lambda: daemon.status()["firehoses"]["files"]["oldest_queued_age_seconds"] > 2)
    assert daemon.status()["firehoses"]["files"]["queued_records"] == 3
    assert daemon.files() == []
    table = daemon.cli("status")
    assert table.returncode == 0, table.stderr
    (row,) = [line for line in table.stdout.splitlines() if line.startswith("files ")]
    assert "paused" in row and " 3 " in row
    assert "\033[" not in table.stdout  # not a terminal: no colour

    resumed = daemon.cli("resume", "files")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert daemon.config_path.read_text() == original  # byte for byte
    wait_until(lambda: len(daemon.delivered()) == 3)
    status = daemon.status()["firehoses"]["files"]
    assert status["paused"] is False and status["queued_records"] == 0


def test_config_set_adds_a_key_and_reloads(make_daemon) -> None:
    daemon = make_daemon(COMMENTED).start()
    original = daemon.config_path.read_text()
    result = daemon.cli("config", "set", "firehoses.other.paused", "true")
    assert result.returncode == 0, result.stdout + result.stderr
    types = 'types = ["never"]   # nothing reaches it\n'
    expected = original.replace(types, types + "paused = true\n")  # at the end of its table
    assert daemon.config_path.read_text() == expected
    assert daemon.status()["firehoses"]["other"]["paused"] is True


def test_an_invalid_config_set_exits_2_and_leaves_the_file_identical(make_daemon) -> None:
    daemon = make_daemon(COMMENTED).start()
    original = daemon.config_path.read_bytes()
    line = original.decode().splitlines().index('format = "ndjson"') + 1
    result = daemon.cli("config", "set", "firehoses.files.format", "xml")
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"{daemon.config_path}:{line}: firehoses.files.format:")
    assert daemon.config_path.read_bytes() == original
    bad_size = daemon.cli("config", "set", "storage.max_disk", "lots")
    assert bad_size.returncode == 2 and "storage.max_disk: invalid size" in bad_size.stderr
    assert daemon.cli("pause", "nope").returncode == 2
    assert daemon.config_path.read_bytes() == original
    assert sorted(p.name for p in daemon.root.iterdir() if p.name.startswith(".")) == []


def test_config_set_without_a_daemon_says_so(make_daemon) -> None:
    daemon = make_daemon(COMMENTED)
    result = daemon.cli("config", "set", "server.max_body", '"2MiB"')
    assert result.returncode == 0, result.stderr
    assert "not running" in result.stdout
    assert 'max_body = "2MiB"' in daemon.config_path.read_text()


def test_status_json_is_the_admin_document(make_daemon) -> None:
    daemon = make_daemon(COMMENTED).start()
    result = daemon.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document["firehoses"]) == {"files", "other"}
    assert document["firehoses"]["files"]["failing_since"] is None
    daemon.stop()
    down = daemon.cli("status")
    assert down.returncode == 1 and "not answering" in down.stderr
