"""Hostile and malformed input: always a 4xx with a JSON `error`, never a 500, and the
daemon stays healthy (the next good request is accepted and delivered)."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest
import requests

from tests.daemon import Daemon, signal_record, wait_until

FIREHOSE = """
[firehoses.files]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.005
"""
DEEP = 100_000


def oids(records: list[dict[str, Any]]) -> list[int]:
    return [int(r["signal_id"]["$oid"], 16) for r in records]


def line(record: Any) -> bytes:
    return json.dumps(record).encode() + b"\n"


def assert_client_error(response: requests.Response) -> dict[str, Any]:
    """A 4xx whose body is JSON with a non-empty `error` string."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    payload: dict[str, Any] = response.json()
    assert isinstance(payload.get("error"), str) and payload["error"], payload
    return payload


def assert_still_healthy(daemon: Daemon, delivered_before: list[int] | None = None) -> None:
    """A good POST right after gets 202 and is the next thing delivered."""
    assert daemon.get("/healthz").status_code == 200
    response = daemon.post([signal_record(999)])
    assert response.status_code == 202, response.text
    expected = [*(delivered_before or []), 999]
    wait_until(lambda: oids(daemon.delivered()) == expected)
    assert not daemon.events("http.unhandled_error")


# -- whole bodies that cannot be taken -------------------------------------------------

JSON_BODIES: dict[str, bytes] = {
    "invalid UTF-8": b'{"type": "pd", "name": "caf\xe9"}',
    "invalid UTF-8 in a key": b'{"typ\xff": "pd"}',
    "truncated JSON": b'[{"type": "pd"}, {"type": "c", "did": "s',
    "trailing garbage": b'{"type": "pd"} {"type": "c"}',
    "trailing garbage after an array": b'[{"type": "pd"}] garbage',
    "NaN": b'{"type": "pd", "price": NaN}',
    "Infinity": b'{"type": "pd", "price": Infinity}',
    "-Infinity": b'[{"type": "pd", "price": -Infinity}]',
    "100k-deep array": b"[" * DEEP + b"]" * DEEP,
    "100k-deep object": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "100k-deep object inside a record": b'{"type": "pd", "x": '
    + b'{"a":' * DEEP
    + b"1"
    + b"}" * DEEP
    + b"}",
    "empty body": b"",
    "whitespace only": b" \r\n\t ",
    "lone high surrogate": b'{"type": "pd", "name": "\\ud800"}',
    "lone low surrogate": b'{"type": "pd", "name": "\\udc00"}',
    "lone surrogate in the type": b'{"type": "\\ud800"}',
    "lone surrogate in the session": b'{"type": "pd", "did": "x\\ud800y"}',
    "high surrogate before a non-surrogate": b'{"type": "pd", "name": "\\ud800\\u0041"}',
    "an unquoted key": b'{type: "pd"}',
    "single quotes": b"{'type': 'pd'}",
}


@pytest.mark.parametrize("body", JSON_BODIES.values(), ids=JSON_BODIES.keys())
def test_an_unparseable_body_is_a_400(make_daemon, body: bytes) -> None:
    daemon = make_daemon(FIREHOSE).start()
    assert_client_error(daemon.post(body))
    assert_still_healthy(daemon)


SCALARS = {"5": b"5", '"x"': b'"x"', "null": b"null", "true": b"true", "-0.5": b"-0.5"}


@pytest.mark.parametrize("body", SCALARS.values(), ids=SCALARS.keys())
def test_a_scalar_body_is_a_400_naming_record_0(make_daemon, body: bytes) -> None:
    daemon = make_daemon(FIREHOSE).start()
    payload = assert_client_error(daemon.post(body))
    assert [r["index"] for r in payload["rejected"]] == [0]
    assert_still_healthy(daemon)


def test_an_array_of_scalars_is_a_400_naming_each(make_daemon) -> None:
    daemon = make_daemon(FIREHOSE).start()
    payload = assert_client_error(daemon.post(b'[1, "two", null, false, [], 6.5]'))
    assert payload["error"]
    assert [r["index"] for r in payload["rejected"]] == [0, 1, 2, 3, 4, 5]
    assert all(r["error"] for r in payload["rejected"])
    assert_still_healthy(daemon)


def bad_crc(member: bytes) -> bytes:
    """A gzip member whose CRC-32 trailer (the 4 bytes before the length) is wrong."""
    return member[:-8] + bytes([member[-8] ^ 0xFF]) + member[-7:]


GZIP_BODIES = {
    "not gzip at all": b"this is not gzip" * 10,
    "truncated gzip": gzip.compress(line(signal_record(1)) * 50)[:-20],
    "gzip with a bad checksum": bad_crc(gzip.compress(line(signal_record(1)))),
    "gzip header only": gzip.compress(b"")[:10],
}


@pytest.mark.parametrize("body", GZIP_BODIES.values(), ids=GZIP_BODIES.keys())
def test_corrupt_gzip_is_a_400(make_daemon, body: bytes) -> None:
    daemon = make_daemon(FIREHOSE).start()
    response = daemon.post(
        body, content_type="application/x-ndjson", headers={"Content-Encoding": "gzip"}
    )
    assert_client_error(response)
    assert_still_healthy(daemon)


# -- records rejected one by one, the rest accepted -----------------------------------

BAD_RECORDS: dict[str, Any] = {
    "type as number": {"type": 5},
    "type as object": {"type": {"name": "pd"}},
    "type null": {"type": None},
    "no type": {"did": "s1"},
    "empty type": {"type": ""},
    "65-character type": {"type": "a" * 65},
    "type with a dot": {"type": "cart.add"},
    "all-digit type": {"type": "123"},
    "session as object": {"type": "pd", "did": {"id": "s1"}},
    "session as array": {"type": "pd", "did": ["s1"]},
    "person as object": {"type": "pd", "did": "s1", "pid": {"id": "p1"}},
    "person as bool": {"type": "pd", "pid": True},
    "time unparseable": {"type": "pd", "evdt": {"$date": "last tuesday"}},
    "plain time unparseable": {"type": "pd", "evdt": "2026-13-45T99:00:00Z"},
    "time as bool": {"type": "pd", "evdt": {"$date": True}},
    "time as array": {"type": "pd", "evdt": [2026, 11, 23]},
    "time far out of range": {"type": "pd", "evdt": {"$date": 1e300}},
    "id as bool": {"type": "pd", "signal_id": True},
    "id as array": {"type": "pd", "signal_id": ["a"]},
    "id as float": {"type": "pd", "signal_id": {"$oid": 1.5}},
    "a string": "pd",
    "a number": 42,
    "null": None,
    "an array": [{"type": "pd"}],
}


def interleave(bad: list[Any]) -> tuple[list[Any], list[int], list[int]]:
    """Good records 0, 2, 4… around the bad ones: (body, bad indexes, good oids)."""
    body: list[Any] = []
    bad_at, good = [], []
    for n, record in enumerate(bad):
        good.append(2 * n)
        body.append(signal_record(2 * n))
        bad_at.append(len(body))
        body.append(record)
    good.append(2 * len(bad))
    body.append(signal_record(2 * len(bad)))
    return body, bad_at, good


def test_each_bad_record_is_rejected_by_index_and_the_others_accepted(make_daemon) -> None:
    daemon = make_daemon(FIREHOSE).start()
    body, bad_at, good = interleave(list(BAD_RECORDS.values()))
    response = daemon.post(body)
    assert response.status_code == 202, response.text
    payload = response.json()
    rejected = {r["index"]: r["error"] for r in payload["rejected"]}
    named = {name: rejected.get(i) for name, i in zip(BAD_RECORDS, bad_at, strict=True)}
    assert all(named.values()), f"not rejected: {[n for n, e in named.items() if not e]}"
    assert sorted(rejected) == bad_at
    assert payload["accepted"] == len(good)
    wait_until(lambda: oids(daemon.delivered()) == good)
    assert_still_healthy(daemon, good)


def test_a_5000_digit_integer_in_the_time_path_rejects_only_that_record(make_daemon) -> None:
    daemon = make_daemon(FIREHOSE).start()
    huge = "9" * 5000
    body = b"[" + line(signal_record(1)) + b', {"type": "pd", "evdt": ' + huge.encode() + b"}]"
    response = daemon.post(body)
    assert response.status_code == 202, response.text
    assert [r["index"] for r in response.json()["rejected"]] == [1]
    assert_still_healthy(daemon, [1])


def test_a_5000_digit_integer_in_the_payload_is_kept_verbatim(make_daemon) -> None:
    """The contract keeps a record byte-for-byte; the daemon never needs that number's value."""
    daemon = make_daemon(FIREHOSE).start()
    huge = b"-" + b"7" * 5000
    record = line(signal_record(1))[:-2] + b', "quantity": ' + huge + b"}"
    response = daemon.post(record)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 1
    files = wait_until(daemon.files)
    assert huge in files[0].read_bytes()


def test_accepted_edge_cases_pass_through_verbatim(make_daemon) -> None:
    daemon = make_daemon(FIREHOSE).start()
    records = [
        line(signal_record(1, kind="a" * 64)),
        line(signal_record(2, kind="2b")),
        line(signal_record(3, kind="café")),
        line(signal_record(4, name="\U0001f600")),
        line(signal_record(5))[:-2] + b', "name": "\\ud83d\\ude00 \\u00e9"}',
        line(signal_record(6, pid="")),  # an empty person is anonymous, not an error
        b"\xef\xbb\xbf" + line(signal_record(7)),  # a UTF-8 BOM before the body
    ]
    for body in records:
        response = daemon.post(body)
        assert response.status_code == 202, (body[:80], response.text)
    wait_until(lambda: oids(daemon.delivered()) == [1, 2, 3, 4, 5, 6, 7])
    kinds = [r["type"] for r in daemon.delivered()]
    assert kinds[:3] == ["a" * 64, "2b", "café"]
    assert daemon.delivered()[4]["name"] == "\U0001f600 é"


# -- NDJSON: one bad line among good ones ----------------------------------------------

BAD_LINES = {
    "not JSON": b"this is not json",
    "truncated": b'{"type": "pd", "did": "s1"',
    "trailing garbage": b'{"type": "pd"} trailing',
    "NaN": b'{"type": "pd", "x": NaN}',
    "lone surrogate": b'{"type": "pd", "did": "\\ud800"}',
    "100k-deep": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "an array": b'[{"type": "pd"}]',
    "a scalar": b"17",
    "bad type": b'{"type": "a.b"}',
}


def test_each_bad_ndjson_line_is_rejected_by_index_and_the_others_accepted(
    make_daemon,
) -> None:
    daemon = make_daemon(FIREHOSE).start()
    lines: list[bytes] = []
    bad_at, good = [], []
    for n, bad in enumerate([*BAD_LINES.values(), None]):
        good.append(2 * n)
        lines.append(json.dumps(signal_record(2 * n)).encode())
        if bad is not None:
            bad_at.append(len(lines))
            lines.append(bad)
    response = daemon.post(b"\n".join(lines) + b"\n", content_type="application/x-ndjson")
    assert response.status_code == 202, response.text
    payload = response.json()
    rejected = {r["index"]: r["error"] for r in payload["rejected"]}
    named = {name: rejected.get(i) for name, i in zip(BAD_LINES, bad_at, strict=True)}
    assert all(named.values()), f"not rejected: {[n for n, e in named.items() if not e]}"
    assert sorted(rejected) == bad_at
    assert payload["accepted"] == len(good)
    wait_until(lambda: oids(daemon.delivered()) == good)
    assert_still_healthy(daemon, good)


def test_ndjson_with_invalid_utf8_on_one_line_is_a_400(make_daemon) -> None:
    """UTF-8 is checked for the whole body before it is split into lines."""
    daemon = make_daemon(FIREHOSE).start()
    body = line(signal_record(1)) + b'{"type": "pd", "name": "\xc3\x28"}\n'
    assert_client_error(daemon.post(body, content_type="application/x-ndjson"))
    assert_still_healthy(daemon)
