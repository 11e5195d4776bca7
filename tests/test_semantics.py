"""Delivery semantics of DESIGN.md §6 through a real daemon and the files it writes."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.daemon import BASE_CONFIG, Daemon, free_port, signal_record, wait_until

EVENT_TIME = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)  # the time signal_record() carries


def firehose(name: str, **keys: Any) -> str:
    """A firehose of account acme with its own directory channel `export/<name>`.

    NDJSON, cut every 0.6 s, unless `keys` says otherwise.
    """
    table = {
        "account": "acme",
        "channel": name,
        "format": "ndjson",
        "minutes_between_files": 0.01,
        **keys,
    }
    return (
        f'\n[channels.{name}]\ntype = "directory"\npath = "export/{name}"\n'
        f"\n[firehoses.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
    )


def files_of(daemon: Daemon, name: str) -> list[Path]:
    """The files delivered to firehose `name`'s channel, in delivery order.

    Names sort by time, except that a clash suffix (`-1`) sorts before the extension of
    the first name, so the order comes from the `batch.delivered` log events.
    """
    order = {
        event["batch"]: n
        for n, event in enumerate(daemon.events("batch.delivered"))
        if event["firehose"] == name
    }
    return sorted(daemon.files(f"{name}/*"), key=lambda p: (order.get(p.name, len(order)), p.name))


def records_of(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    """Every record delivered to firehose `name`, in delivery order."""
    records: list[dict[str, Any]] = []
    for path in files_of(daemon, name):
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        if ".ndjson" in path.name:
            records += [json.loads(line) for line in data.splitlines()]
        else:
            records += json.loads(data)
    return records


def wait_records(daemon: Daemon, name: str, count: int) -> list[dict[str, Any]]:
    """Wait until firehose `name` has delivered `count` records (fail on more)."""
    wait_until(lambda: len(records_of(daemon, name)) >= count)
    records = records_of(daemon, name)
    assert len(records) == count, records
    return records


def label(record: dict[str, Any]) -> str:
    """`n`, `n+cu` for a catch-up copy, `n@person` when a person is set: order at a glance."""
    if record["type"] == "pi":
        return f"pi:{record['session']}@{record['person']}"
    text = str(int(record["signal_id"]["$oid"], 16))
    if record.get("catch_up"):
        text += "+cu"
    if "pid" in record:
        text += f"@{record['pid']}"
    return text


def post_ok(daemon: Daemon, body: Any, **kwargs: Any) -> dict[str, Any]:
    response = daemon.post(body, **kwargs)
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


def pi_time(record: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(record["time"].replace("Z", "+00:00"))


# -- routing, anonymous signals, identification and catch-up ---------------------------


def test_catch_up_replays_the_session_with_the_person_before_the_identifying_signal(
    make_daemon,
) -> None:
    daemon = make_daemon(
        firehose("everything", catch_up=True, include_anonymous=True)
        + firehose("identified", catch_up=True, include_anonymous=False)
        + firehose("plain", catch_up=False, include_anonymous=True)
        + firehose("known_only", catch_up=False, include_anonymous=False)
    ).start()
    post_ok(daemon, signal_record(1, session="s1", prod={"prid": "cam"}))
    post_ok(daemon, signal_record(2, kind="c", session="s1"))
    post_ok(daemon, signal_record(50, session="other"))  # another session: never replayed
    post_ok(daemon, signal_record(3, kind="cu", session="s1", person="p1"))
    post_ok(daemon, signal_record(4, kind="t", session="s1"))  # later, no person
    post_ok(daemon, signal_record(5, session="s1", person="p1"))  # identified again: no replay

    everything = wait_records(daemon, "everything", 8)
    assert [label(r) for r in everything] == [
        "1",
        "2",
        "50",
        "1+cu@p1",
        "2+cu@p1",
        "3@p1",
        "4@p1",
        "5@p1",
    ]
    identified = wait_records(daemon, "identified", 5)
    assert [label(r) for r in identified] == ["1+cu@p1", "2+cu@p1", "3@p1", "4@p1", "5@p1"]
    plain = wait_records(daemon, "plain", 6)
    assert [label(r) for r in plain] == ["1", "2", "50", "3@p1", "4@p1", "5@p1"]
    known = wait_records(daemon, "known_only", 3)
    assert [label(r) for r in known] == ["3@p1", "4@p1", "5@p1"]

    # a catch-up copy is the original plus the person and the flag, nothing else
    original, copy = everything[0], everything[3]
    assert copy == {**original, "pid": "p1", "catch_up": True}
    assert "catch_up" not in everything[6]  # a later signal gets the person, not the flag
    assert everything[6] == {**signal_record(4, kind="t", session="s1"), "pid": "p1"}


def test_signals_per_session_bounds_the_catch_up_ring(make_daemon) -> None:
    extra = "\n[catch_up]\nsignals_per_session = 3\n"
    daemon = make_daemon(extra + firehose("known", catch_up=True, include_anonymous=False)).start()
    post_ok(daemon, [signal_record(n, session="s1") for n in range(1, 6)])
    post_ok(daemon, signal_record(6, session="s1", person="p1"))
    records = wait_records(daemon, "known", 4)
    assert [label(r) for r in records] == ["3+cu@p1", "4+cu@p1", "5+cu@p1", "6@p1"]


def test_catch_up_in_one_request_keeps_the_same_order(make_daemon) -> None:
    daemon = make_daemon(firehose("known", catch_up=True, include_anonymous=False)).start()
    post_ok(
        daemon,
        [
            signal_record(1, session="s1"),
            signal_record(2, session="s2"),
            signal_record(3, session="s1"),
            signal_record(4, session="s1", person="p1"),
            signal_record(5, session="s2", person="p2"),
        ],
    )
    records = wait_records(daemon, "known", 5)
    assert [label(r) for r in records] == ["1+cu@p1", "3+cu@p1", "4@p1", "2+cu@p2", "5@p2"]


def test_send_person_identified_adds_one_pi_record(make_daemon) -> None:
    daemon = make_daemon(
        firehose("with_pi", send_person_identified=True, include_anonymous=False)
        + firehose("without_pi", include_anonymous=False)
    ).start()
    post_ok(daemon, signal_record(1, session="s1"))
    post_ok(daemon, signal_record(2, session="s1", person="p1"))
    post_ok(daemon, signal_record(3, session="s1", person="p1"))  # already identified
    records = wait_records(daemon, "with_pi", 3)
    pis = [r for r in records if r["type"] == "pi"]
    assert len(pis) == 1, records
    assert set(pis[0]) == {"type", "session", "person", "time"}
    assert (pis[0]["session"], pis[0]["person"]) == ("s1", "p1")
    assert pi_time(pis[0]) == EVENT_TIME
    assert [label(r) for r in records if r["type"] != "pi"] == ["2@p1", "3@p1"]
    without = wait_records(daemon, "without_pi", 2)
    assert [label(r) for r in without] == ["2@p1", "3@p1"]


def test_a_session_stays_identified_for_session_ttl_only(make_daemon) -> None:
    extra = '\n[catch_up]\nsession_ttl = "1s"\n'
    daemon = make_daemon(extra + firehose("ttl")).start()
    post_ok(daemon, signal_record(1, session="s1", person="p1"))
    post_ok(daemon, signal_record(2, session="s1"))
    time.sleep(1.3)  # the TTL itself is what is under test
    post_ok(daemon, signal_record(3, session="s1"))
    assert [label(r) for r in wait_records(daemon, "ttl", 3)] == ["1@p1", "2@p1", "3"]


def test_types_filter(make_daemon) -> None:
    daemon = make_daemon(firehose("sales", types=["c", "t"]) + firehose("all")).start()
    kinds = ["pd", "c", "t", "b", "ba", "cu", "t"]
    post_ok(daemon, [signal_record(n, kind=k) for n, k in enumerate(kinds)])
    assert [r["type"] for r in wait_records(daemon, "all", 7)] == kinds
    assert [r["type"] for r in wait_records(daemon, "sales", 3)] == ["c", "t", "t"]


def test_paused_stages_and_a_reload_delivers_the_backlog(make_daemon) -> None:
    daemon = make_daemon(firehose("held", paused=True)).start()
    post_ok(daemon, [signal_record(n) for n in range(3)])
    # cut while paused: the batch is fixed on disk but not delivered
    wait_until(lambda: daemon.status()["firehoses"]["held"]["batches_pending"] >= 1)
    status = daemon.status()["firehoses"]["held"]
    assert status["paused"] is True
    assert status["queued_records"] == 3
    assert files_of(daemon, "held") == []
    daemon.write_config(firehose("held", paused=False))
    daemon.signal(signal.SIGHUP)
    assert [label(r) for r in wait_records(daemon, "held", 3)] == ["0", "1", "2"]
    assert daemon.status()["firehoses"]["held"]["paused"] is False
    events = [e["event"] for e in daemon.events()]
    assert events.index("config.reloaded") < events.index("batch.delivered")


def test_a_stream_batch_reaches_a_file_channel_after_a_reload(make_daemon) -> None:
    """A webhook batch holds its bytes in its manifest; when a reload points the
    firehose at a channel that reads files, they are written out and delivered."""
    down = f'\n[channels.hook]\ntype = "webhook"\nurl = "http://127.0.0.1:{free_port()}/x"\n'
    daemon = make_daemon(down + firehose("moved").replace('channel = "moved"', 'channel = "hook"'))
    daemon.start()
    post_ok(daemon, [signal_record(n) for n in range(3)])
    wait_until(lambda: daemon.events("batch.failed"))  # cut, and refused
    daemon.write_config(firehose("moved"))
    daemon.signal(signal.SIGHUP)
    assert [label(r) for r in wait_records(daemon, "moved", 3)] == ["0", "1", "2"]
    (path,) = files_of(daemon, "moved")
    assert path.name.endswith(".json")  # the batch as it was cut for the webhook


def test_an_account_without_a_firehose_gets_the_fallback(make_daemon) -> None:
    """JSON, catch-up on, anonymous included, under `{account}/Firehose/` of the channel."""
    other = '\n[accounts.other]\ntokens = ["other-token"]\n'
    daemon = make_daemon(other).start()
    post_ok(daemon, signal_record(1, session="s1"))
    post_ok(daemon, signal_record(2, session="s1", person="p1"))
    post_ok(daemon, signal_record(7), account="other", token="other-token")
    assert daemon.stop() == 0  # the drain cuts the open batches (fallback cuts every 5 min)
    files = daemon.files()
    assert [p.relative_to(daemon.export).parent.as_posix() for p in files] == [
        "acme/Firehose",
        "other/Firehose",
    ]
    assert all(p.suffix == ".json" for p in files)
    acme = json.loads(files[0].read_bytes())
    assert [label(r) for r in acme] == ["1", "1+cu@p1", "2@p1"]
    assert [label(r) for r in json.loads(files[1].read_bytes())] == ["7"]


# -- files: formats, compression, names ------------------------------------------------

MAPPING = """
[mappings.cols]
type = "type"
person = "pid"
email = "person.email"
product = "cart.p.0.prid"
note = "note"
cart = "cart"
total = "cart.cv"
flag = "flag"
missing = "no.such.path"
"""


def test_csv_has_a_header_and_rfc4180_rows(make_daemon) -> None:
    daemon = make_daemon(MAPPING + firehose("sheet", format="csv", mapping="cols")).start()
    full = signal_record(
        1,
        kind="c",
        person="p1",
        cart={"p": [{"prid": "cam", "n": "Shiny"}], "cv": 158.99},
        note='a, "quoted"\nline',
        flag=True,
    )
    full["person"] = {"email": "jo@example.com"}
    sparse = signal_record(2, note="café ☕", cart={"p": []}, flag=None)
    post_ok(daemon, [full, sparse])
    (path,) = wait_until(lambda: files_of(daemon, "sheet"))
    assert path.suffix == ".csv"
    data = path.read_bytes()
    expected = (
        "type,person,email,product,note,cart,total,flag,missing\r\n"
        'c,p1,jo@example.com,cam,"a, ""quoted""\nline",'
        '"{""p"":[{""prid"":""cam"",""n"":""Shiny""}],""cv"":158.99}",158.99,true,\r\n'
        'pd,,,,café ☕,"{""p"":[]}",,,\r\n'
    )
    assert data.decode("utf-8") == expected
    assert not data.startswith(b"\xef\xbb\xbf")
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert rows[1][4] == 'a, "quoted"\nline'
    assert len(rows) == 3


def test_json_is_one_array_of_the_records_byte_for_byte(make_daemon) -> None:
    daemon = make_daemon(firehose("arr", format="json")).start()
    raws = [
        b'{"type":"pd", "signal_id": {"$oid": "a1"},  "x": 1.50}',
        b'{ "type" : "c","signal_id":"a2","nested":{"k":[1,2,{"z":null}]}}',
    ]
    post_ok(daemon, b"\n".join(raws), content_type="application/x-ndjson")
    (path,) = wait_until(lambda: files_of(daemon, "arr"))
    assert path.name.endswith(".json")
    assert path.read_bytes() == b"[" + b",".join(raws) + b"]"


def test_ndjson_is_one_line_per_record_byte_for_byte_unless_it_spans_lines(
    make_daemon,
) -> None:
    daemon = make_daemon(firehose("lines", format="ndjson")).start()
    compact = b'{"type":"pd", "signal_id": {"$oid": "a1"},  "x": 1.50}'
    pretty = b'{\n  "type": "c",\r\n  "signal_id": "a2",\n  "note": "two\\nlines"\n}'
    post_ok(daemon, b"[" + compact + b",\n" + pretty + b"]")
    (path,) = wait_until(lambda: files_of(daemon, "lines"))
    assert path.read_bytes() == (
        compact + b"\n" + b'{"type":"c","signal_id":"a2","note":"two\\nlines"}\n'
    )


def test_json_with_a_mapping_adds_mapped_fields(make_daemon) -> None:
    daemon = make_daemon(MAPPING + firehose("mapped", format="json", mapping="cols")).start()
    record = signal_record(1, kind="c", person="p1", cart={"p": [{"prid": "cam"}], "cv": 9.5})
    post_ok(daemon, record)
    (delivered,) = wait_records(daemon, "mapped", 1)
    assert delivered == {
        **record,
        "mapped_fields": {
            "type": "c",
            "person": "p1",
            "product": "cam",
            "cart": {"p": [{"prid": "cam"}], "cv": 9.5},
            "total": 9.5,
        },
    }
    assert list(delivered)[-1] == "mapped_fields"


def test_gzip_compression_writes_json_gz(make_daemon) -> None:
    daemon = make_daemon(firehose("zipped", format="json", compression="gzip")).start()
    post_ok(daemon, [signal_record(1), signal_record(2)])
    (path,) = wait_until(lambda: files_of(daemon, "zipped"))
    assert path.name.endswith(".json.gz")
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert [label(r) for r in json.loads(gzip.decompress(path.read_bytes()))] == ["1", "2"]


def test_a_file_is_cut_early_at_max_file(make_daemon) -> None:
    daemon = make_daemon(firehose("big", max_file="1KiB", minutes_between_files=60)).start()
    records = [signal_record(n, note="x" * 100) for n in range(30)]
    post_ok(daemon, records)
    one = len(json.dumps(records[0]))
    # 30 records of ~180 bytes: cut into several files at once, not in an hour
    wait_until(lambda: len(records_of(daemon, "big")) == 30)
    files = files_of(daemon, "big")
    assert len(files) >= 4
    assert all(p.stat().st_size < 1024 + 2 * one for p in files)
    assert [label(r) for r in records_of(daemon, "big")] == [str(n) for n in range(30)]


def test_a_file_waiting_for_its_time_is_cut_when_it_reaches_max_file(make_daemon) -> None:
    daemon = make_daemon(firehose("grow", max_file="1KiB", minutes_between_files=60)).start()
    post_ok(daemon, signal_record(0))  # the worker now waits an hour to cut this file
    for n in range(1, 10):  # each commit alone is no news to it, until the file is full
        post_ok(daemon, signal_record(n, note="x" * 100))
    wait_until(lambda: len(records_of(daemon, "grow")) >= 6)
    assert [label(r) for r in records_of(daemon, "grow")][:6] == [str(n) for n in range(6)]


def test_default_names_are_utc_times_with_microseconds(make_daemon) -> None:
    daemon = make_daemon(firehose("named")).start()
    before = datetime.now(UTC)
    post_ok(daemon, signal_record(1))
    (first,) = wait_until(lambda: files_of(daemon, "named"))
    post_ok(daemon, signal_record(2))
    paths = wait_until(lambda: len(files_of(daemon, "named")) == 2 and files_of(daemon, "named"))
    assert paths[0] == first
    for path in paths:
        assert re.fullmatch(r"firehose-\d{4}(-\d\d){5}-\d{6}\.ndjson", path.name), path.name
    opened = datetime.strptime(first.name, "firehose-%Y-%m-%d-%H-%M-%S-%f.ndjson")
    assert abs(opened.replace(tzinfo=UTC) - before).total_seconds() < 5


def test_a_name_clash_gets_a_numbered_suffix_before_the_extension(make_daemon) -> None:
    daemon = make_daemon(firehose("clash", filename_pattern="x-%Y%m%d%H")).start()
    # keep all three batches inside one UTC hour (waits only in the last 20 s of an hour)
    wait_until(lambda: datetime.now(UTC).strftime("%M%S") < "5940", timeout=25, interval=0.2)
    base = datetime.now(UTC).strftime("x-%Y%m%d%H")
    for n in range(3):
        post_ok(daemon, signal_record(n))
        wait_until(lambda n=n: len(files_of(daemon, "clash")) == n + 1)
    names = [p.name for p in files_of(daemon, "clash")]
    assert sorted(names) == sorted([f"{base}.ndjson", f"{base}-1.ndjson", f"{base}-2.ndjson"])
    by_name = {p.name: p.read_bytes() for p in files_of(daemon, "clash")}
    assert [json.loads(by_name[f"{base}{s}.ndjson"])["type"] for s in ("", "-1", "-2")] == [
        "pd"
    ] * 3
    assert [
        int(json.loads(by_name[f"{base}{s}.ndjson"])["signal_id"]["$oid"], 16)
        for s in ("", "-1", "-2")
    ] == [0, 1, 2]


def test_a_catch_up_copy_opening_a_file_never_replaces_the_file_its_signal_opened(
    make_daemon,
) -> None:
    """Signal 1 (anonymous) opens file A with signal 2; another file comes between; when
    session s is identified, the catch-up copy of signal 1, received with it, opens the
    next file. Named after that time, the file took A's name and replaced it, and signal
    2 was gone: it takes the last file's name with the next suffix."""
    daemon = make_daemon(firehose("c", catch_up=True, include_anonymous=True)).start()
    post_ok(daemon, [signal_record(1, session="s"), signal_record(2, session="other")])
    wait_until(lambda: len(files_of(daemon, "c")) == 1)
    post_ok(daemon, signal_record(3, session="third"))
    wait_until(lambda: len(files_of(daemon, "c")) == 2)
    post_ok(daemon, signal_record(4, session="s", person="p"))
    wait_until(lambda: len(files_of(daemon, "c")) == 3)
    _, second, third = (p.name for p in files_of(daemon, "c"))
    assert third == second.replace(".ndjson", "-1.ndjson")
    ids = [int(r["signal_id"]["$oid"], 16) for r in records_of(daemon, "c")]
    assert ids == [1, 2, 3, 1, 4]  # (1 twice: anonymous, then its copy with the person)


# -- ids, times, dedupe ----------------------------------------------------------------


def test_dedupe_inside_the_window(make_daemon) -> None:
    daemon = make_daemon(firehose("once")).start()
    plain_id = {**signal_record(0), "signal_id": f"{2:024x}"}  # the same id, not wrapped
    assert post_ok(daemon, [signal_record(1), signal_record(1), signal_record(2)]) == {
        "accepted": 2,
        "duplicates": 1,
        "rejected": [],
    }
    assert post_ok(daemon, [signal_record(1), plain_id]) == {
        "accepted": 0,
        "duplicates": 2,
        "rejected": [],
    }
    no_id = {"type": "pd", "did": "s9"}  # the daemon assigns ids: never a duplicate
    assert post_ok(daemon, [no_id, no_id])["accepted"] == 2
    post_ok(daemon, signal_record(3))
    records = wait_records(daemon, "once", 5)
    assert [r.get("signal_id", {}).get("$oid") for r in records] == [
        f"{1:024x}",
        f"{2:024x}",
        None,
        None,
        f"{3:024x}",
    ]


def test_an_id_is_accepted_again_after_the_dedupe_window(make_daemon) -> None:
    base = BASE_CONFIG.replace('tokens = ["{token}"]', 'tokens = ["{token}"]\ndedupe_window = "1s"')
    daemon = make_daemon(firehose("window"), base=base).start()
    assert post_ok(daemon, signal_record(1))["accepted"] == 1
    assert post_ok(daemon, signal_record(1))["duplicates"] == 1
    time.sleep(1.2)  # the window itself is what is under test
    assert post_ok(daemon, signal_record(1))["accepted"] == 1
    assert [label(r) for r in wait_records(daemon, "window", 2)] == ["1", "1"]


def test_wrapped_and_plain_ids_and_times_are_read_alike(make_daemon) -> None:
    """`{"$oid": x}` / `{"$date": t}` or the plain value; times as ISO 8601 or epoch ms."""
    daemon = make_daemon(
        firehose("pis", send_person_identified=True, include_anonymous=False)
    ).start()
    iso = "2026-11-23T10:00:00.000Z"
    times = {
        "wrapped iso": {"$date": iso},
        "plain iso": iso,
        "plain iso with offset": "2026-11-23T11:00:00+01:00",
        "naive iso is UTC": "2026-11-23T10:00:00",
        "wrapped epoch ms": {"$date": int(EVENT_TIME.timestamp() * 1000)},
        "plain epoch ms": int(EVENT_TIME.timestamp() * 1000),
    }
    for n, (name, moment) in enumerate(times.items()):
        record = {**signal_record(n, session=name, person="p"), "evdt": moment}
        post_ok(daemon, record)
    pis = [r for r in wait_records(daemon, "pis", 2 * len(times)) if r["type"] == "pi"]
    assert {r["session"]: pi_time(r) for r in pis} == dict.fromkeys(times, EVENT_TIME)
    wrapped = post_ok(daemon, {"type": "pd", "signal_id": {"$oid": "abc"}})
    plain = post_ok(daemon, {"type": "pd", "signal_id": "abc"})
    assert (wrapped["accepted"], plain["duplicates"]) == (1, 1)


# -- retries, dead letters, idempotent batches -----------------------------------------


def blocked_channel(daemon: Daemon, name: str) -> str:
    """Firehose `name` into a directory under a regular FILE: every delivery fails."""
    (daemon.root / "blocker").write_text("a file where a directory should be")
    return firehose(name).replace(f'path = "export/{name}"', 'path = "blocker/export"')


def test_a_failing_batch_is_retried_until_the_destination_recovers(make_daemon) -> None:
    daemon = make_daemon()
    daemon.write_config(blocked_channel(daemon, "retry"))
    daemon.start()
    post_ok(daemon, [signal_record(1), signal_record(2)])
    wait_until(lambda: daemon.status()["firehoses"]["retry"]["last_error"])
    (daemon.root / "blocker").unlink()  # the destination comes back
    delivered = daemon.root / "blocker" / "export"
    (path,) = wait_until(lambda: list(delivered.glob("*.ndjson")), timeout=30)
    assert [label(json.loads(line)) for line in path.read_bytes().splitlines()] == ["1", "2"]
    wait_until(lambda: daemon.status()["firehoses"]["retry"]["last_delivery"])
    assert daemon.status()["firehoses"]["retry"]["queued_records"] == 0
    assert len(daemon.events("batch.failed")) >= 1


def test_a_backlog_is_delivered_file_by_file_as_it_is_cut(make_daemon) -> None:
    """A backlog of many files' worth (here, behind a failing destination) is cut one
    file ahead of the put: the next file is cut while one is put, never more, so
    delivery resumes at once instead of after the last file is cut."""
    daemon = make_daemon()
    daemon.write_config(blocked_channel(daemon, "backlog") + 'max_file = "1KiB"\n')
    daemon.start()
    post_ok(daemon, [signal_record(n, note="x" * 100) for n in range(40)])

    def pending() -> int:
        return int(daemon.status()["firehoses"]["backlog"]["batches_pending"])

    wait_until(lambda: pending() >= 2)  # the first file refused, the second cut meanwhile
    failures = len(daemon.events("batch.failed"))
    wait_until(lambda: len(daemon.events("batch.failed")) >= failures + 2, timeout=30)
    assert pending() == 2  # retrying the first file cuts nothing more
    (daemon.root / "blocker").unlink()  # the destination comes back
    wait_until(lambda: daemon.status()["firehoses"]["backlog"]["queued_records"] == 0)
    cut = delivered = 0
    for event in daemon.events():
        cut += event["event"] == "batch.cut"
        delivered += event["event"] == "batch.delivered"
        assert cut - delivered <= 2, "more than one file cut ahead of the one being put"
    assert cut == delivered >= 6  # 40 records of ~180 bytes: at least 6 files
    export = daemon.root / "blocker" / "export"
    lines = [
        line
        for event in daemon.events("batch.delivered")
        for line in (export / event["batch"]).read_bytes().splitlines()
    ]
    assert [label(json.loads(line)) for line in lines] == [str(n) for n in range(40)]


def test_a_batch_failing_past_retry_for_goes_to_the_dead_letter_store(make_daemon) -> None:
    daemon = make_daemon()
    daemon.write_config(blocked_channel(daemon, "doomed") + 'retry_for = "1s"\n')
    daemon.start()
    post_ok(daemon, [signal_record(1), signal_record(2)])
    (event,) = wait_until(lambda: daemon.events("batch.dead_lettered"), timeout=30)
    assert event["records"] == 2
    dead = daemon.root / "var" / "dead" / "doomed"
    payloads = [p for p in dead.iterdir() if p.suffix != ".json"]
    assert len(payloads) == 1
    assert [label(json.loads(x)) for x in payloads[0].read_bytes().splitlines()] == ["1", "2"]
    status = daemon.status()["firehoses"]["doomed"]
    assert status["queued_records"] == 0
    assert status["last_error"]
    # the firehose keeps working for new signals once the destination is back
    (daemon.root / "blocker").unlink()
    post_ok(daemon, signal_record(3))
    wait_until(lambda: list((daemon.root / "blocker" / "export").glob("*.ndjson")), timeout=30)


def test_a_cut_batch_keeps_its_name_and_contents_across_a_crash(make_daemon) -> None:
    daemon = make_daemon()
    daemon.write_config(blocked_channel(daemon, "fixed"))
    daemon.start()
    post_ok(daemon, [signal_record(1), signal_record(2)])
    (cut,) = wait_until(lambda: daemon.events("batch.cut"))
    wait_until(lambda: daemon.events("batch.failed"))
    daemon.kill()
    daemon.write_config(firehose("fixed"))  # the destination is fine after the restart
    daemon.start()
    post_ok(daemon, signal_record(3))
    wait_until(lambda: len(records_of(daemon, "fixed")) == 3)
    names = [p.name for p in files_of(daemon, "fixed")]
    assert cut["batch"] in names
    assert len(names) == 2
    first = (daemon.export / "fixed" / cut["batch"]).read_bytes()
    assert [label(json.loads(x)) for x in first.splitlines()] == ["1", "2"]
