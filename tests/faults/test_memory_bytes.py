"""Memory bounded in bytes, not entries, against a real `firehosed run` process.

Seen ("ack-integrity"): 1200 records with 100 KB ids, sessions and persons grew the
daemon by 513 MiB: the envelope kept strings of any length, and catch-up charged each
session a fixed 150 B whatever its key and person. Now an envelope string over its limit
rejects that record (README, HTTP API), and catch-up charges each session its real bytes,
identified sessions included, so `catch_up.max_memory` bounds what it holds.
"""

from __future__ import annotations

import json
from typing import Any

from tests.daemon import BASE_CONFIG, Daemon, signal_record, wait_until
from tests.faults.report import report
from tests.faults.test_hostile_input import FIREHOSE, proc_status

LONG = 100 * 1024
LONG_RECORDS = 1200
PER_REQUEST = 3  # three 300 KB records and a good one fit BASE_CONFIG's max_body (1 MiB)
RSS_GROWTH_LIMIT_MIB = 64
FIELD_LIMIT = 256  # README: id, session and person at most 256 bytes (UTF-8)


def padded(prefix: str, size: int) -> str:
    """`prefix` padded with "x" to `size` characters (and bytes: ASCII)."""
    return prefix + "x" * (size - len(prefix))


def long_record(n: int) -> dict[str, Any]:
    """A record whose id, session and person are each 100 KB (and unique)."""
    record = signal_record(n, session=padded(f"s{n}-", LONG), person=padded(f"p{n}-", LONG))
    record["signal_id"] = {"$oid": padded(f"{n:024x}", LONG)}
    return record


def delivered_ids(daemon: Daemon) -> list[str]:
    return [r["signal_id"]["$oid"] for r in daemon.delivered("*.ndjson")]


def test_records_with_100kb_envelope_strings_are_rejected_and_rss_stays_flat(
    make_daemon,
) -> None:
    daemon = make_daemon(FIREHOSE).start()
    # Warm up (first requests import and allocate what any later one reuses).
    for n in range(20):
        assert daemon.post([signal_record(n, session=f"warm{n}", person="p")]).status_code == 202
    rss_before = proc_status(daemon, "VmRSS")
    answers = []
    good = []
    for first in range(0, LONG_RECORDS, PER_REQUEST):
        body = [long_record(n) for n in range(first, first + PER_REQUEST)]
        body.append(signal_record(10_000 + first, session=f"ok{first}", person=f"po{first}"))
        good.append(f"{10_000 + first:024x}")
        response = daemon.post(json.dumps(body))
        answers.append((response.status_code, response.json()))
    grown_mib = (proc_status(daemon, "VmRSS") - rss_before) / 1024
    report("100 KB envelope strings x1200", rss_growth_mib=round(grown_mib, 1))
    assert grown_mib < RSS_GROWTH_LIMIT_MIB, f"RSS grew by {grown_mib:.0f} MiB"
    # Every over-long record is refused by index with its reason; the good one kept.
    reason = f"id is {LONG} bytes, at most {FIELD_LIMIT}"
    expected = {
        "accepted": 1,
        "duplicates": 0,
        "rejected": [{"index": i, "error": reason} for i in range(PER_REQUEST)],
    }
    wrong = [a for a in answers if a != (202, expected)]
    assert not wrong, f"{len(wrong)} answers like {wrong[0]}"
    wait_until(lambda: set(good) <= set(delivered_ids(daemon)), timeout=30)
    assert all(len(i) == 24 for i in delivered_ids(daemon)), "an over-long record was stored"


def test_each_envelope_field_is_limited_in_utf8_bytes(make_daemon) -> None:
    """At the limit is accepted, one byte over is rejected naming the field and its size;
    sizes are UTF-8 bytes, not characters ("é" is two)."""
    daemon = make_daemon(FIREHOSE).start()

    def with_id(n: int, oid: str) -> dict[str, Any]:
        return {**signal_record(n), "signal_id": {"$oid": oid}}

    cases: list[tuple[dict[str, Any], str | None]] = [
        (with_id(0, padded("0", FIELD_LIMIT)), None),
        (with_id(1, padded("1", FIELD_LIMIT + 1)), f"id is {FIELD_LIMIT + 1} bytes"),
        (signal_record(2, session=padded("s", FIELD_LIMIT)), None),
        (signal_record(3, session=padded("s", FIELD_LIMIT + 1)), f"session is {FIELD_LIMIT + 1}"),
        (signal_record(4, session="s4", person=padded("p", FIELD_LIMIT)), None),
        (signal_record(5, session="s5", person=padded("p", 300)), "person is 300 bytes"),
        # 128 characters of two bytes each: exactly at the limit
        (signal_record(6, session="é" * 128), None),
        # 150 characters, 300 bytes: over it
        (signal_record(7, session="é" * 150), "session is 300 bytes"),
        (signal_record(8, person="€" * 100), "person is 300 bytes"),
        (signal_record(9, kind="t" * 65), "type must be 1 to 64 characters"),
        (signal_record(10, evdt={"$date": "2026-11-23T10:00:00Z" + " " * 200}), "time is 220"),
        # a plain (unwrapped) id takes the same check
        ({**signal_record(11), "signal_id": padded("b", 4000)}, "id is 4000 bytes"),
        # a JSON integer is checked by its digits
        (signal_record(12, session=None, did=int("7" * 300)), "session is 300 bytes"),
        (signal_record(13, session="s13", pid=-int("7" * 256)), "person is 257 bytes"),
        (signal_record(14, did=int("7" * 256)), None),
    ]
    response = daemon.post([record for record, _ in cases])
    assert response.status_code == 202, response.text
    payload = response.json()
    rejected = {r["index"]: r["error"] for r in payload["rejected"]}
    expected = {i: reason for i, (_, reason) in enumerate(cases) if reason is not None}
    assert sorted(rejected) == sorted(expected), payload
    for index, reason in expected.items():
        assert rejected[index].startswith(reason), (index, rejected[index])
        if "bytes" in reason:
            assert rejected[index].endswith(f"at most {FIELD_LIMIT if index != 10 else 64}")
    assert payload["accepted"] == len(cases) - len(expected)


CATCH_UP_MEMORY = 1 << 20
IDENTIFIED = 5000


def catchup_figures(daemon: Daemon) -> dict[str, float]:
    figures = {}
    for entry in daemon.admin("/metrics").text.splitlines():
        if entry.startswith("firehosed_catchup_"):
            name, _, value = entry.rpartition(" ")
            figures[name] = float(value)
    return figures


def test_identified_sessions_are_charged_their_strings_and_evicted_under_max_memory(
    make_daemon,
) -> None:
    """5000 sessions identified with 200-byte session and person strings (within the
    limits) hold about 3 MB: with `max_memory = "1MiB"` the oldest are evicted, the
    newest keep their person."""
    base = BASE_CONFIG + f'\n[catch_up]\nmax_memory = "{CATCH_UP_MEMORY}"\n'
    daemon = make_daemon(FIREHOSE, base=base).start()

    def session(n: int) -> str:
        return padded(f"s{n}-", 200)

    for first in range(0, IDENTIFIED, 500):
        body = [
            signal_record(n, session=session(n), person=padded(f"p{n}-", 200))
            for n in range(first, first + 500)
        ]
        response = daemon.post(body)
        assert response.status_code == 202 and response.json()["accepted"] == 500
    figures = catchup_figures(daemon)
    report("identified 200 B sessions x5000", **figures)
    assert figures["firehosed_catchup_evictions_total"] > 0, figures
    assert figures["firehosed_catchup_bytes"] <= CATCH_UP_MEMORY, figures
    assert figures["firehosed_catchup_sessions"] < IDENTIFIED, figures
    # Later anonymous signals: the newest session is still known, the oldest forgotten.
    last, oldest = IDENTIFIED - 1, 0
    answer = daemon.post(
        [signal_record(90_000, session=session(last)), signal_record(90_001, session=session(0))]
    )
    assert answer.status_code == 202 and answer.json()["accepted"] == 2
    wanted = {f"{90_000:024x}", f"{90_001:024x}"}
    wait_until(lambda: wanted <= set(delivered_ids(daemon)), timeout=30)
    persons = {
        r["signal_id"]["$oid"]: r.get("pid")
        for r in daemon.delivered("*.ndjson")
        if r["signal_id"]["$oid"] in wanted
    }
    assert persons[f"{90_000:024x}"] == padded(f"p{last}-", 200)
    assert persons[f"{90_001:024x}"] is None, f"session {oldest} was not evicted"
