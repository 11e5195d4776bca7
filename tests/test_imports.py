"""Imports, end to end: a real daemon pulls files from a directory source (and takes
uploads), and every row is checked where the firehose delivers it: valid rows all there
once, bad rows all in the run's errors with their reasons. The schedule runs under
Debian's `faketime`, so a cron slot, a DST change and a missed slot come in seconds.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from firehosed.fields import FieldsConfig
from firehosed.imports.child import Job
from firehosed.imports.importer import CHUNK, IN_FLIGHT
from firehosed.imports.reader import PACKAGE_ROOT, PROCESS_FROM
from tests.daemon import BASE_CONFIG, TOKEN, Daemon, wait_until
from tests.test_archive import LIBFAKETIME, faked

HEADER = ["event", "event_id", "customer_id", "session_id", "timestamp", "sku", "cart.total"]


def imports_config(root: Path, task: str) -> str:
    return f"""
[accounts.other]
tokens = ["other-token"]

[channels.inbox]
type = "directory"
path = "{root}/inbox"

[firehoses.all]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.02
{task}
"""


COLUMNS = """
[imports.{task}.columns]
type = "event"
id = "event_id"
person = "customer_id"
session = "session_id"
time = "timestamp"
"""

ONCE = """
[imports.users]
account = "acme"
source = "inbox"
pattern = "users-*.csv"
once = true
""" + COLUMNS.format(task="users")

UPLOADS = """
[imports.uploads]
account = "acme"
""" + COLUMNS.format(task="uploads")


def good_row(n: int) -> list[str]:
    return [
        "purchase" if n % 2 else "c",
        f"e{n:08d}",
        f"cust{n % 97}",
        "",
        f"2026-12-0{1 + n % 3}T10:{n % 60:02d}:00Z",
        f"sku-{n % 500}",
        f"{n % 1000}.5",
    ]


# (row builder, the column at fault, the start of the reason) for the bad rows
BAD: list[tuple[Any, str, str]] = [
    (lambda n: ["c", f"e{n:08d}", "", "", "2026-12-01T10:00:00Z", "x", "1"], "customer_id", "no"),
    (lambda n: ["c", f"e{n:08d}", "p", "", "yesterday", "x", "1"], "timestamp", ""),
    (lambda n: ["a.b", f"e{n:08d}", "p", "", "2026-12-01T10:00:00Z", "x", "1"], "event", ""),
    (lambda n: ["1234", f"e{n:08d}", "p", "", "2026-12-01T10:00:00Z", "x", "1"], "event", ""),
    (lambda n: ["c", f"e{n:08d}", "p", "", "2026-12-01T10:00:00Z", "x"], "", "6 cells"),
]


def write_csv(
    path: Path, rows: int, bad_every: int = 100, first_id: int = 0
) -> tuple[set[str], dict[int, str]]:
    """A CSV of `rows` rows, one in `bad_every` bad, ids from `first_id` + 1; the valid
    ids and {row number: the column at fault}."""
    valid, bad = set(), {}
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(HEADER)
    for n in range(1, rows + 1):
        if n % bad_every == 0:
            make, column, _ = BAD[(n // bad_every) % len(BAD)]
            writer.writerow(make(first_id + n))
            bad[n] = column
        else:
            writer.writerow(good_row(first_id + n))
            valid.add(f"e{first_id + n:08d}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(out.getvalue(), encoding="utf-8")
    return valid, bad


def listed_errors(root: Path, task: str) -> list[dict[str, str]]:
    """The rows of the errors.csv of `task`'s one run."""
    (errors_file,) = (root / "var" / "imports" / task / "runs").glob("*/errors.csv")
    return list(csv.DictReader(io.StringIO(errors_file.read_text(), newline="")))


def finished_run(daemon: Daemon, task: str, timeout: float = 60) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        runs = daemon.status()["imports"][task]["runs"]
        if runs and runs[0]["processing"]["status"] in ("processed", "failed"):
            return runs[0]  # type: ignore[no-any-return]
        return None

    return wait_until(done, timeout=timeout)  # type: ignore[no-any-return]


def delivered_ids(daemon: Daemon, expected: int, timeout: float = 60) -> Counter[str]:
    """How often each id was delivered, once `expected` distinct ids were (counting
    records instead, a run's resent rows made the wait end before its last batch)."""

    def ids() -> Counter[str]:
        return Counter(r["signal_id"]["$oid"] for r in daemon.delivered())

    wait_until(lambda: len(ids()) >= expected, timeout=timeout)
    time.sleep(0.3)  # anything more (a double) would arrive in the next batch
    return ids()


def test_every_valid_row_arrives_once_and_every_bad_row_is_listed_with_its_reason(
    tmp_path: Path,
) -> None:
    valid, bad = write_csv(tmp_path / "inbox" / "users-2026-12-04.csv", 100_000)
    (tmp_path / "inbox" / "other.csv").write_text("not,taken\r\n")
    daemon = Daemon(tmp_path, imports_config(tmp_path, ONCE))
    try:
        daemon.start()
        run = finished_run(daemon, "users")
        assert run["fetch"]["status"] == "fetched"
        assert run["processing"] | {"started": None, "ended": None} == {
            "status": "processed",
            "started": None,
            "ended": None,
            "rows": 100_000,
            "imported": len(valid),
            "duplicates": 0,
            "errored": len(bad),
        }
        assert delivered_ids(daemon, len(valid)) == Counter(valid)
        sample = daemon.delivered()[0]
        assert sample["cart"] == {"total": sample["cart"]["total"]} and "sku" in sample
        # Every errored row is in the run's errors file, with its column and reason.
        listed = listed_errors(tmp_path, "users")
        assert {int(e["row"]): e["column"] for e in listed} == bad
        for entry in listed:
            _, _, reason = BAD[(int(entry["row"]) // 100) % len(BAD)]
            assert entry["reason"].startswith(reason) and entry["file"] == "users-2026-12-04.csv"
        # The run's status answers the first 100 (the admin listener for any account).
        document = daemon.admin(f"/v1/imports/{run['run']}").json()
        assert [e["row"] for e in document["errors"]] == sorted(bad)[:100]
        scraped = daemon.admin("/metrics").text
        assert (
            f'firehosed_import_rows_total{{import="users",outcome="imported"}} {len(valid)}.0'
            in scraped
        )
        assert (
            f'firehosed_import_rows_total{{import="users",outcome="errored"}} {len(bad)}.0'
            in scraped
        )
        assert 'firehosed_import_last_success_timestamp_seconds{import="users"}' in scraped
        # A one-time task is completed; its file is in the ledger, never taken twice.
        assert daemon.status()["imports"]["users"]["status"] == "completed"
        table = daemon.cli("imports")
        assert table.returncode == 0 and "users  acme  inbox  completed" in table.stdout
        assert f"{len(valid):,} imported, {len(bad):,} errored" in table.stdout
    finally:
        daemon.close()


def test_a_progress_save_that_fails_is_written_again_and_costs_no_row(tmp_path: Path) -> None:
    # The run's second and third progress saves fail as a dying disk's writes do; the
    # rows go on being committed meanwhile, and the save is written again.
    valid, bad = write_csv(tmp_path / "inbox" / "users-2026-12-04.csv", 20_000)
    daemon = Daemon(tmp_path, imports_config(tmp_path, ONCE))
    try:
        daemon.start(env={"FIREHOSED_FAIL_AT": "import.save:2:2"})
        run = finished_run(daemon, "users")
        processing = run["processing"]
        assert (processing["status"], processing["imported"]) == ("processed", len(valid))
        assert processing["errored"] == len(bad)
        assert [e["seconds"] for e in daemon.events("import.save_failed")] == [1.0, 2.0]
        assert delivered_ids(daemon, len(valid)) == Counter(valid)
        listed = listed_errors(tmp_path, "users")
        assert [int(e["row"]) for e in listed] == sorted(bad)  # each once, in order
    finally:
        daemon.close()


def test_a_daemon_stops_while_a_save_keeps_failing_and_the_run_resumes(tmp_path: Path) -> None:
    # From the run's second progress save on, every save fails: the run takes no more
    # rows, the daemon still stops at once, and the run resumes from its last save.
    valid, bad = write_csv(tmp_path / "inbox" / "users-2026-12-04.csv", 100_000)
    daemon = Daemon(tmp_path, imports_config(tmp_path, ONCE))
    try:
        daemon.start(env={"FIREHOSED_FAIL_AT": "import.save:2:1000"})
        wait_until(lambda: len(daemon.events("import.save_failed")) >= 2, timeout=30)
        stopping = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - stopping < 10
        daemon.start()
        run = finished_run(daemon, "users")
        processing = run["processing"]
        assert (processing["status"], processing["rows"]) == ("processed", 100_000)
        delivered = delivered_ids(daemon, len(valid))
        assert set(delivered) == valid  # none lost
        # Rows kept past the last save are sent again (duplicates where their batch was
        # delivered before the stop): no more than the chunks in flight when it failed.
        again = sum(count - 1 for count in delivered.values())
        assert again <= (IN_FLIGHT + 2) * CHUNK
        listed = listed_errors(tmp_path, "users")
        assert [int(e["row"]) for e in listed] == sorted(bad)
    finally:
        daemon.close()


@pytest.mark.parametrize(
    ("fail", "event"),
    [
        # A bug counting the third chunk kept: the run resumes from its last save.
        ("import.settle_bug:3:1", "import.run_failed"),
        # The disk fails the save that starts processing: the same, before any row.
        ("import.run_save:5:1", "import.run_failed"),
        # The disk fails the new run's first save: the task's loop starts again.
        ("import.run_save:1:1", "import.loop_failed"),
    ],
)
def test_an_error_escaping_a_run_resumes_it_after_a_pause_and_costs_no_row(
    tmp_path: Path, fail: str, event: str
) -> None:
    valid, bad = write_csv(tmp_path / "inbox" / "users-2026-12-04.csv", 20_000)
    daemon = Daemon(tmp_path, imports_config(tmp_path, ONCE))
    try:
        daemon.start(env={"FIREHOSED_FAIL_AT": fail})
        run = finished_run(daemon, "users")
        processing = run["processing"]
        assert (processing["status"], processing["rows"]) == ("processed", 20_000)
        assert processing["imported"] + processing["duplicates"] == len(valid)
        assert processing["errored"] == len(bad)
        assert [e["seconds"] for e in daemon.events(event)] == [1.0]
        assert delivered_ids(daemon, len(valid)) == Counter(valid)
        listed = listed_errors(tmp_path, "users")
        assert [int(e["row"]) for e in listed] == sorted(bad)  # each once, in order
    finally:
        daemon.close()


def uploaded(
    daemon: Daemon, task: str, body: bytes, headers: dict[str, str]
) -> tuple[str, dict[str, Any]]:
    """POST `body` as an upload for `task`: its run's id, and its document once processed."""
    url = f"{daemon.url}/v1/accounts/acme/imports"
    posted = daemon.session.post(url, params={"columns": task}, data=body, headers=headers)
    assert posted.status_code == 202, posted.text
    run: str = posted.json()["run"]

    def processed() -> dict[str, Any] | None:
        got: dict[str, Any] = daemon.session.get(f"{url}/{run}", headers=headers).json()
        return got if got["processing"]["status"] == "processed" else None

    return run, wait_until(processed, timeout=30)


def test_an_upload_is_durable_before_its_202_and_processed_like_a_pulled_file(
    tmp_path: Path,
) -> None:
    base = BASE_CONFIG.replace('max_body = "1MiB"', 'max_body = "1MiB"\nmax_upload = "2MiB"')
    daemon = Daemon(tmp_path, imports_config(tmp_path, UPLOADS), base=base)
    url = f"{daemon.url}/v1/accounts/acme/imports"
    valid, bad = write_csv(tmp_path / "upload.csv", 2_000, bad_every=50)
    body = (tmp_path / "upload.csv").read_bytes()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/csv"}
    try:
        daemon.start()
        run, document = uploaded(daemon, "uploads", body, headers)
        assert document["fetch"]["status"] == "fetched" and document["task"] == "uploads"
        assert document["processing"]["imported"] == len(valid)
        assert {e["row"]: e["column"] for e in document["errors"]} == bad
        assert delivered_ids(daemon, len(valid)) == Counter(valid)

        # gzip, as Content-Encoding
        gz_headers = {**headers, "Content-Encoding": "gzip"}
        again = daemon.session.post(
            url, params={"columns": "uploads"}, data=gzip.compress(body), headers=gz_headers
        )
        assert again.status_code == 202
        # Bad uploads: each its own status and reason.
        other = {**headers, "Authorization": "Bearer other-token"}
        cases = [
            (
                daemon.session.post(url, params={"columns": "uploads"}, data=body, headers=other),
                401,
            ),
            (daemon.session.get(f"{url}/{run}", headers=other), 401),
            (daemon.session.post(url, params={"columns": "nope"}, data=body, headers=headers), 404),
            (
                daemon.session.post(
                    url,
                    params={"columns": "uploads"},
                    data=body,
                    headers={**headers, "Content-Type": "application/x-ndjson"},
                ),
                415,
            ),
            (
                daemon.session.post(
                    url, params={"columns": "uploads"}, data=b"x" * (3 << 20), headers=headers
                ),
                413,
            ),
            (daemon.session.get(f"{url}/20990101T000000Z-00000000", headers=headers), 404),
        ]
        for response, status in cases:
            assert response.status_code == status, (status, response.text)
            assert response.json()["error"]
        runs = list((tmp_path / "var" / "imports" / "uploads" / "runs").iterdir())
        assert len(runs) == 2, "a refused upload leaves no run"
        # A paused task takes no upload until it is resumed (the file is edited, reloaded).
        assert daemon.cli("pause", "uploads").returncode == 0
        assert 'status = "paused"' in daemon.config_path.read_text()
        wait_until(lambda: daemon.status()["imports"]["uploads"]["status"] == "paused")
        paused = daemon.session.post(url, params={"columns": "uploads"}, data=body, headers=headers)
        assert paused.status_code == 409 and "paused" in paused.json()["error"]
        assert daemon.cli("resume", "uploads").returncode == 0
        wait_until(lambda: daemon.status()["imports"]["uploads"]["status"] == "launched")
        # `firehosed imports --run` prints the run and its first errored rows.
        shown = daemon.cli("imports", "--run", run)
        assert shown.returncode == 0, shown.stderr
        assert f"processing processed  (2,000 rows, {len(valid):,} imported" in shown.stdout
        assert "errored rows (first 100):\n  upload row 50 " in shown.stdout
    finally:
        daemon.close()


def killed_midway_and_resumed(daemon: Daemon, task: str, rows: int) -> dict[str, Any]:
    """Start `daemon`, kill -9 it while its run of `task` is part-way through its `rows`
    rows, start it again; the run once processed, every row counted."""
    daemon.start()

    def midway() -> bool:
        runs = daemon.status()["imports"][task]["runs"]
        return bool(runs) and 20_000 < runs[0]["processing"]["rows"] < rows * 0.8

    wait_until(midway, timeout=60, interval=0.01)
    daemon.kill()
    daemon.start()
    run = finished_run(daemon, task, timeout=120)
    assert run["processing"]["status"] == "processed"
    assert run["processing"]["rows"] == rows
    return run


def test_kill_9_mid_run_resumes_and_every_row_arrives_exactly_once(tmp_path: Path) -> None:
    valid, _ = write_csv(tmp_path / "inbox" / "users-1.csv", 300_000, bad_every=1000)
    daemon = Daemon(tmp_path, imports_config(tmp_path, ONCE))
    try:
        killed_midway_and_resumed(daemon, "users", 300_000)
        ids = delivered_ids(daemon, len(valid), timeout=120)
        assert ids == Counter(valid), "every valid row once: none lost, none doubled"
    finally:
        daemon.close()


needs_faketime = pytest.mark.skipif(LIBFAKETIME is None, reason="libfaketime not installed")

SCHEDULED = """
[imports.users]
account = "acme"
source = "inbox"
pattern = "users-%Y-%m-%d.csv"
schedule = "30 8 * * *"
timezone = "America/New_York"
offset = "-1d"
""" + COLUMNS.format(task="users")


@needs_faketime
def test_cron_runs_in_its_time_zone_across_dst_and_a_missed_slot_runs_once(
    tmp_path: Path,
) -> None:
    valid: set[str] = set()
    for n, day in enumerate(("2026-03-06", "2026-03-07", "2026-03-08", "2026-03-09")):
        ids, _ = write_csv(tmp_path / "inbox" / f"users-{day}.csv", 10, 1000, first_id=100 * n)
        valid |= ids if day != "2026-03-08" else set()
    daemon = Daemon(tmp_path, imports_config(tmp_path, SCHEDULED))
    try:
        # 08:29:30 EST on 7 March: the 08:30 slot comes 3 s (real) later.
        daemon.start(env=faked("2026-03-07 13:29:30"))
        first = finished_run(daemon, "users")
        assert (first["trigger"], first["day"]) == ("schedule", "2026-03-06")
        daemon.stop()
        # 8 March, clocks went forward: 08:29:30 EDT is 12:29:30 UTC. Had the schedule
        # kept EST, its slot would be 13:30 UTC, an hour later.
        daemon.start(env=faked("2026-03-08 12:29:30"))
        wait_until(lambda: len(daemon.status()["imports"]["users"]["runs"]) == 2)
        second = finished_run(daemon, "users")
        assert (second["trigger"], second["day"]) == ("schedule", "2026-03-07")
        assert second["fetch"]["started"].startswith("2026-03-08T12:30")
        daemon.stop()
        # Down over the 9th's and 10th's slots: one run on start, for the latest slot.
        daemon.start(env=faked("2026-03-10 15:00:00"))
        wait_until(lambda: len(daemon.status()["imports"]["users"]["runs"]) == 3)
        third = finished_run(daemon, "users")
        assert (third["trigger"], third["day"]) == ("missed", "2026-03-09")
        time.sleep(2)
        runs = daemon.status()["imports"]["users"]["runs"]
        assert len(runs) == 3, "a missed slot runs once, not once per missed slot"
        assert delivered_ids(daemon, 30) == Counter(valid), "the 8th's file was never due"
    finally:
        daemon.close()


def test_a_file_is_taken_once_unless_it_changes(tmp_path: Path) -> None:
    """The ledger: a run takes only files it has not taken (by name, size, version)."""
    inbox = tmp_path / "inbox"
    write_csv(inbox / "users-a.csv", 10, bad_every=1000)
    task = ONCE.replace("once = true", 'schedule = "* * * * *"')
    daemon = Daemon(tmp_path, imports_config(tmp_path, task))
    try:
        if LIBFAKETIME is None:
            pytest.skip("libfaketime not installed (a minute-long schedule needs it)")
        daemon.start(env=faked("2026-12-04 10:00:50"))
        first = finished_run(daemon, "users")
        assert [f["name"] for f in first["files"]] == ["users-a.csv"]
        write_csv(inbox / "users-b.csv", 5, bad_every=1000, first_id=100)
        second = wait_until(
            lambda: [
                r
                for r in daemon.status()["imports"]["users"]["runs"]
                if r["run"] != first["run"] and r["processing"]["status"] == "processed"
            ],
            timeout=30,
        )[0]
        assert [f["name"] for f in second["files"]] == ["users-b.csv"]
        os.utime(inbox / "users-a.csv", (1, 1))
        third = wait_until(
            lambda: [
                r
                for r in daemon.status()["imports"]["users"]["runs"]
                if r["run"] not in (first["run"], second["run"])
                and r["files"]
                and r["processing"]["status"] == "processed"
            ],
            timeout=30,
        )[0]
        assert [f["name"] for f in third["files"]] == ["users-a.csv"]
        # Changed (its mtime): taken again; its rows' ids were seen, so they are dropped.
        assert third["processing"]["duplicates"] == 10
        assert third["processing"]["imported"] == 0
    finally:
        daemon.close()


def test_rows_per_second_holds_a_run_to_its_rate(tmp_path: Path) -> None:
    valid, _ = write_csv(tmp_path / "inbox" / "users-1.csv", 3_000, bad_every=1000)
    task = ONCE.replace("once = true", "once = true\nrows_per_second = 1000")
    daemon = Daemon(tmp_path, imports_config(tmp_path, task))
    try:
        daemon.start()
        run = finished_run(daemon, "users")
        started = datetime.fromisoformat(run["fetch"]["started"].replace("Z", "+00:00"))
        ended = datetime.fromisoformat(run["processing"]["ended"].replace("Z", "+00:00"))
        assert (ended - started).total_seconds() >= 2.5, "3000 rows at 1000 a second"
        assert delivered_ids(daemon, len(valid)) == Counter(valid)
    finally:
        daemon.close()


def with_import_processes(count: int) -> str:
    return BASE_CONFIG.replace("[server]\n", f"[server]\nimport_processes = {count}\n")


def reader_pids(daemon: Daemon) -> list[int]:
    return [e["pid"] for e in daemon.events("import.reader_started")]


def running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie nobody reaped has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_a_large_file_read_in_a_process_of_its_own_gives_what_a_thread_gives(
    tmp_path: Path,
) -> None:
    """The child process (reader.py) and the thread read the same file into the same
    records and the same errored rows; only the child is a process of its own."""
    found = {}
    for count in (1, 0):
        root = tmp_path / f"processes-{count}"
        path = root / "inbox" / "users-1.csv"
        valid, bad = write_csv(path, 150_000)
        assert path.stat().st_size >= PROCESS_FROM
        daemon = Daemon(root, imports_config(root, ONCE), base=with_import_processes(count))
        try:
            daemon.start()
            run = finished_run(daemon, "users", timeout=120)
            assert run["processing"]["status"] == "processed"
            assert (run["processing"]["imported"], run["processing"]["errored"]) == (
                len(valid),
                len(bad),
            )
            assert delivered_ids(daemon, len(valid)) == Counter(valid)
            (errors_file,) = (root / "var" / "imports" / "users" / "runs").glob("*/errors.csv")
            records = sorted(json.dumps(r, sort_keys=True) for r in daemon.delivered())
            found[count] = (records, errors_file.read_text(), reader_pids(daemon))
        finally:
            daemon.close()
    (child_records, child_errors, pids), (thread_records, thread_errors, none) = (
        found[1],
        found[0],
    )
    assert len(pids) == 1 and not none, "a child with import_processes = 1, none with 0"
    assert child_records == thread_records
    assert child_errors == thread_errors


def test_the_reading_process_loads_neither_the_config_nor_openssl(tmp_path: Path) -> None:
    """Each file's child imports only what reading rows takes: the config's cron, zone and
    TOML modules and OpenSSL's libcrypto (behind hashlib) would cost it about 5 MiB, in
    the figure the memory target judges. Its job is unpickled there as the daemon sends it."""
    job = Job(tmp_path / "f.csv", "csv", 0, CHUNK, "users", {}, FieldsConfig(), "f.csv@1")
    code = (
        "import pickle, sys; from firehosed.imports.child import Job; "
        "pickle.loads(sys.stdin.buffer.read()); print(' '.join(sorted(sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": PACKAGE_ROOT}
    loaded = subprocess.run(
        [sys.executable, "-P", "-c", code],
        input=pickle.dumps(job),
        capture_output=True,
        env=env,
        check=True,
    ).stdout.split()
    assert b"firehosed.fields" in loaded
    assert {b"firehosed.config", b"_hashlib", b"cronsim", b"zoneinfo"}.isdisjoint(loaded)


def test_a_reading_process_killed_mid_file_costs_no_row(tmp_path: Path) -> None:
    """kill -9 of the child reading a file: the daemon reads the rest in a thread, from
    the last row it took; every valid row arrives once."""
    valid, _ = write_csv(tmp_path / "inbox" / "users-1.csv", 300_000, bad_every=1000)
    daemon = Daemon(tmp_path, imports_config(tmp_path, ONCE))
    try:
        daemon.start()
        (pid,) = wait_until(lambda: reader_pids(daemon), timeout=30)

        def midway() -> bool:
            runs = daemon.status()["imports"]["users"]["runs"]
            return bool(runs) and 20_000 < runs[0]["processing"]["rows"] < 240_000

        wait_until(midway, timeout=60, interval=0.01)
        os.kill(pid, signal.SIGKILL)
        run = finished_run(daemon, "users", timeout=120)
        assert run["processing"]["status"] == "processed"
        assert run["processing"]["rows"] == 300_000
        (lost,) = daemon.events("import.reader_lost")
        assert lost["exit"] == -signal.SIGKILL and 20_000 < lost["after_row"] < 300_000
        ids = delivered_ids(daemon, len(valid), timeout=120)
        assert ids == Counter(valid), "every valid row once: none lost, none doubled"
    finally:
        daemon.close()


def test_a_reading_process_ends_with_the_daemon_killed_under_it(tmp_path: Path) -> None:
    write_csv(tmp_path / "inbox" / "users-1.csv", 300_000, bad_every=1000)
    daemon = Daemon(tmp_path, imports_config(tmp_path, ONCE))
    try:
        daemon.start()
        (pid,) = wait_until(lambda: reader_pids(daemon), timeout=30)
        assert running(pid), "the child still reads when its daemon is killed"
        daemon.kill()
        assert wait_until(lambda: not running(pid), timeout=30)
    finally:
        daemon.close()


def test_a_file_failing_at_its_end_keeps_and_counts_every_row_before(tmp_path: Path) -> None:
    """A quote never closed in the last row fails the file while chunks before it are
    still being committed: those are kept and counted all the same, and delivered."""
    path = tmp_path / "inbox" / "users-1.csv"
    valid, bad = write_csv(path, 150_000)
    with path.open("a", encoding="utf-8", newline="") as out:
        out.write('purchase,"e99999999,cust1,,2026-12-01T10:00:00Z,sku,1\r\n')
    daemon = Daemon(tmp_path, imports_config(tmp_path, ONCE))
    try:
        daemon.start()
        run = finished_run(daemon, "users", timeout=120)
        assert reader_pids(daemon), "read in a process of its own"
        processing = run["processing"]
        assert processing["status"] == "failed"
        assert "never closed" in processing["error"]
        assert (processing["imported"], processing["errored"]) == (len(valid), len(bad))
        assert delivered_ids(daemon, len(valid)) == Counter(valid)
    finally:
        daemon.close()
