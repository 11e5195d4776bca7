"""Hostile input and hostile clients against a real `firehosed run` process.

Each catalogue case gets the exact status of the README's HTTP API table (never a 500),
a JSON `error`, and the index of every rejected record; the daemon stays healthy. While a
catalogue runs, a thread posts good records the whole time: each of its requests must get
a 202 promptly and each of its records must be delivered.

Hostile clients: slow header senders (slowloris), slow bodies, idle connections and
10 000 open connections must not starve a good client, and a production daemon closes a
connection that sends no complete request, or no complete body, within a time limit.
aiohttp's server has no header-read timeout; its `keepalive_timeout` timer starts when a
connection opens (and again after each response) and closes the connection when it fires
while no complete request has arrived, so it also bounds slow headers. Nothing in aiohttp
bounds a slow body: the handler must. The tests of those limits configure the keys this
suite proposes, `server.idle_timeout` and `server.body_timeout` (see their docstrings).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import resource
import select
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.daemon import BASE_CONFIG, TOKEN, Daemon, signal_record, wait_until
from tests.faults.report import report

MAX_BODY = 1 << 20  # BASE_CONFIG's max_body = "1MiB"
DEEP = 100_000
GOOD_LATENCY_LIMIT = 2.0  # seconds: a good request slower than this was starved
SIGNALS = "/v1/accounts/acme/signals"

FIREHOSES = """
[firehoses.files]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.005

[firehoses.only_a]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.005
prefix = "only_a/"
types = ["a"]

[firehoses.only_b]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.005
prefix = "only_b/"
types = ["b"]
"""
FIREHOSE = FIREHOSES.split("[firehoses.only_a]", maxsplit=1)[0]


# -- helpers -------------------------------------------------------------------------


def oids(records: list[dict[str, Any]]) -> list[int]:
    """The numbers `signal_record(n)` put in each record's id (records without one skipped)."""
    found = []
    for record in records:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            found.append(int(record["signal_id"]["$oid"], 16))
    return found


def delivered_lines(daemon: Daemon, pattern: str = "*.ndjson") -> list[bytes]:
    """Every line of every delivered file matching `pattern` (root: the `files` firehose)."""
    return [ln for path in daemon.files(pattern) for ln in path.read_bytes().splitlines() if ln]


def delivered(daemon: Daemon, pattern: str = "*.ndjson") -> list[dict[str, Any]]:
    """Records of the delivered files matching `pattern` (big integers kept as text)."""
    return [json.loads(raw, parse_int=str) for raw in delivered_lines(daemon, pattern)]


def line(record: Any) -> bytes:
    return json.dumps(record).encode() + b"\n"


def ndjson(*lines: bytes) -> bytes:
    return b"\n".join(lines) + b"\n"


def proc_status(daemon: Daemon, key: str) -> int:
    """A KiB figure (VmRSS, VmHWM) from /proc/<pid>/status."""
    assert daemon.proc is not None
    for entry in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if entry.startswith(f"{key}:"):
            return int(entry.split()[1])
    raise AssertionError(f"no {key} line")


def open_fds(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def with_server_keys(**keys: str) -> str:
    """BASE_CONFIG with extra `[server]` keys."""
    extra = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    return BASE_CONFIG.replace('drain_timeout = "10s"\n', 'drain_timeout = "10s"\n' + extra)


@dataclass
class Answer:
    """An HTTP answer, from requests or read off a raw socket."""

    status: int
    content_type: str
    body: bytes

    @classmethod
    def of(cls, response: requests.Response) -> Answer:
        return cls(response.status_code, response.headers.get("Content-Type", ""), response.content)

    def json(self) -> Any:
        return json.loads(self.body)


def read_answer(sock: socket.socket, timeout: float) -> Answer | None:
    """Read one HTTP answer (None if the server closed without one)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)
            }
            length = int(headers.get("content-length", "0"))
            if len(rest) >= length:
                return Answer(int(lines[0].split()[1]), headers.get("content-type", ""), rest)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        data += chunk


def raw_exchange(daemon: Daemon, request: bytes) -> Answer:
    """Send `request` as is on a fresh connection; the answer."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(request)
        answer = read_answer(sock, 10)
    assert answer is not None, f"no answer to {request[:80]!r}"
    return answer


def head(content_length: int | None = None, *, token: str | None = TOKEN, extra: str = "") -> bytes:
    """The head of a signals POST."""
    lines = [f"POST {SIGNALS} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


# -- concurrent good traffic ---------------------------------------------------------


@dataclass
class GoodTraffic:
    """A thread posting good records, JSON arrays and NDJSON in turn, until stopped."""

    daemon: Daemon
    first: int
    per_request: int = 3
    accepted: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> GoodTraffic:
        self._thread = threading.Thread(target=self._run, name="good-traffic")
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)

    def _run(self) -> None:
        url = f"{self.daemon.url}{SIGNALS}"
        n = self.first
        with requests.Session() as session:
            while not self._stop.is_set():
                batch = list(range(n, n + self.per_request))
                n += self.per_request
                records = [signal_record(i) for i in batch]
                if len(self.latencies) % 2:
                    body, kind = b"".join(line(r) for r in records), "application/x-ndjson"
                else:
                    body, kind = json.dumps(records).encode(), "application/json"
                started = time.monotonic()
                try:
                    response = session.post(
                        url,
                        data=body,
                        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": kind},
                        timeout=30,
                    )
                except requests.RequestException as exc:
                    self.failures.append(f"good request failed: {exc!r}")
                    continue
                finally:
                    self.latencies.append(time.monotonic() - started)
                if response.status_code == 202 and response.json()["accepted"] == len(batch):
                    self.accepted += batch
                else:
                    self.failures.append(f"good request: {response.status_code} {response.text}")
                time.sleep(0.002)  # pacing: leave the daemon to the catalogue too

    def problems(self) -> list[str]:
        found = list(self.failures)
        if not self.latencies:
            found.append("the good traffic sent nothing")
        elif max(self.latencies) > GOOD_LATENCY_LIMIT:
            found.append(f"a good request took {max(self.latencies):.2f}s (starved)")
        return found

    def figures(self) -> dict[str, object]:
        ordered = sorted(self.latencies)
        return {
            "good_requests": len(ordered),
            "good_p50_ms": round(1000 * ordered[len(ordered) // 2], 1),
            "good_max_ms": round(1000 * ordered[-1], 1),
        }


# -- the catalogue -------------------------------------------------------------------


@dataclass
class Case:
    """One hostile request and what the README says the answer is."""

    name: str
    body: bytes = b""
    status: int = 400
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    rejected: list[int] | None = None  # the indexes the answer must list
    accepted: int | None = None
    raw: bytes | None = None  # a whole raw HTTP request instead (framing errors)
    chunked: bool = False  # send `body` without Content-Length
    json_error: bool = True


def send(daemon: Daemon, case: Case) -> Answer:
    if case.raw is not None:
        return raw_exchange(daemon, case.raw)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": case.content_type}
    headers.update(case.headers)
    data: Any = case.body
    if case.chunked:
        data = (case.body[i : i + 65536] for i in range(0, len(case.body), 65536))
    url = f"{daemon.url}{SIGNALS}"
    return Answer.of(daemon.session.post(url, data=data, headers=headers, timeout=30))


def check(case: Case, answer: Answer) -> list[str]:
    """What is wrong with `answer` to `case` (nothing: an empty list)."""
    shown = f"{case.name}: {answer.status} {answer.body[:300]!r}"
    if answer.status != case.status:
        return [f"{shown} (expected {case.status})"]
    problems = []
    payload: Any = None
    if "application/json" in answer.content_type:
        payload = answer.json()
    has_error = isinstance(payload, dict) and isinstance(payload.get("error"), str)
    if case.status != 202 and case.json_error and not has_error:
        problems.append(f"{shown}: no JSON error")
    if case.rejected is not None:
        listed = [r.get("index") for r in (payload or {}).get("rejected", [])]
        if listed != case.rejected:
            problems.append(f"{shown}: rejected indexes {listed} (expected {case.rejected})")
    if case.accepted is not None and (payload or {}).get("accepted") != case.accepted:
        problems.append(f"{shown}: accepted != {case.accepted}")
    return problems


def run_catalogue(daemon: Daemon, cases: list[Case], first_good: int) -> list[str]:
    """Every case in turn while good traffic flows; every problem found, with its name."""
    problems: list[str] = []
    with GoodTraffic(daemon, first_good) as traffic:
        for case in cases:
            try:
                problems += check(case, send(daemon, case))
            except requests.RequestException as exc:
                problems.append(f"{case.name}: no answer: {exc!r}")
            if daemon.get("/healthz").status_code != 200:
                problems.append(f"{case.name}: /healthz failed after it")
    problems += traffic.problems()
    accepted = set(traffic.accepted)
    try:
        wait_until(lambda: accepted <= set(oids(delivered(daemon))), timeout=20)
    except AssertionError:
        missing = accepted - set(oids(delivered(daemon)))
        problems.append(f"{len(missing)} accepted good records never delivered")
    problems += [f"unhandled error logged: {e}" for e in daemon.events("http.unhandled_error")]
    # A client's bad request is the client's problem: no ERROR traceback per request (a
    # flood vector, and aiohttp's quotes the offending header, which may be a token).
    if tracebacks := daemon.log_text().count("Traceback"):
        problems.append(f"{tracebacks} tracebacks logged for bad requests")
    report(f"hostile catalogue ({len(cases)} cases)", **traffic.figures())
    return problems


def deep_array(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def good(n: int) -> bytes:
    return json.dumps(signal_record(n)).encode()


UNPARSEABLE = [
    Case("truncated JSON", b'[{"type": "pd"}, {"type": "c", "did": "s'),
    Case("truncated object", good(1)[:-1]),
    Case("trailing garbage after an object", good(1) + b" garbage"),
    Case("two objects without an array", good(1) + good(2)),
    Case("trailing garbage after an array", b"[" + good(1) + b"] ]"),
    Case("invalid UTF-8 byte", b'{"type": "pd", "name": "caf\xe9"}'),
    Case("overlong UTF-8 encoding of '/'", b'{"type": "pd", "name": "\xc0\xaf"}'),
    Case("UTF-8-encoded lone surrogate (CESU)", b'{"type": "pd", "name": "\xed\xa0\x80"}'),
    Case("escaped lone high surrogate", b'{"type": "pd", "name": "\\ud800"}'),
    Case("escaped lone low surrogate in an array", b'[{"type": "pd", "n": "\\udfff"}]'),
    Case("NaN", b'{"type": "pd", "price": NaN}'),
    Case("Infinity", b'[{"type": "pd", "price": Infinity}]'),
    Case("-Infinity", b'{"type": "pd", "price": -Infinity}'),
    Case("100k-deep array", deep_array(DEEP)),
    Case("100k-deep object", deep_object(DEEP)),
    Case("100k-deep value inside a record", b'{"type": "pd", "x": ' + deep_array(DEEP) + b"}"),
    Case("a 100k-deep record among good ones", b"[" + good(1) + b"," + deep_object(DEEP) + b"]"),
    Case("empty body", b""),
    Case("whitespace only", b" \r\n\t "),
    Case("a BOM and nothing else", b"\xef\xbb\xbf"),
    Case("two BOMs", b"\xef\xbb\xbf\xef\xbb\xbf" + good(1)),
    Case("NDJSON of blank lines", b"\n\n \n", content_type="application/x-ndjson"),
    Case("scalar number", b"5", rejected=[0]),
    Case("scalar string", b'"pd"', rejected=[0]),
    Case("null", b"null", rejected=[0]),
    Case("array of scalars", b'[1, "two", null, false, [], 6.5]', rejected=[0, 1, 2, 3, 4, 5]),
    Case(
        "NDJSON where every line is bad",
        ndjson(b"nope", b"[1]", b'{"type": "a.b"}'),
        content_type="application/x-ndjson",
        rejected=[0, 1, 2],
    ),
    # Framing errors: aiohttp's parser answers before the app runs (plain-text 400).
    Case(
        "Content-Length and Transfer-Encoding together (smuggling)",
        raw=head(5, extra="Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n",
        json_error=False,
    ),
    Case(
        "two different Content-Lengths",
        raw=head(2, extra="Content-Length: 40\r\n") + b"{}",
        json_error=False,
    ),
    Case(
        "not HTTP at all",
        raw=b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        json_error=False,
    ),
    Case(
        "a header line over 8 KiB",
        raw=head(0, extra="X-Pad: " + "p" * 9000 + "\r\n"),
        json_error=False,
    ),
    Case(
        "200 headers",
        raw=head(0, extra="".join(f"X-H{i}: v\r\n" for i in range(200))),
        json_error=False,
    ),
]


def test_every_unparseable_body_is_a_400_while_good_traffic_flows(make_daemon) -> None:
    daemon = make_daemon(FIREHOSE).start()
    problems = run_catalogue(daemon, UNPARSEABLE, first_good=1_000_000)
    assert not problems, "\n".join(problems)
    assert 1 not in oids(delivered(daemon)), "a record of a 400 body was stored"


def gzip_bomb(inflated: int) -> bytes:
    """A gzip stream of a JSON array padded with `inflated` spaces (about 1000:1)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [packer.compress(b"[" + good(1))]
    block = b" " * (1 << 20)
    for _ in range(inflated >> 20):
        parts.append(packer.compress(block))
    parts.append(packer.compress(b"]") + packer.flush())
    return b"".join(parts)


def bad_crc(member: bytes) -> bytes:
    """A gzip member whose CRC32 trailer no longer matches its data."""
    return member[:-8] + bytes([member[-8] ^ 0xFF]) + member[-7:]


def limit_cases() -> list[Case]:
    over = b"[" + good(1) + b"," + b" " * MAX_BODY + b"]"
    one_huge = json.dumps(signal_record(2, blob="x" * (MAX_BODY + 10))).encode()
    return [
        Case("text/plain", good(3), 415, content_type="text/plain"),
        Case("form data", b"type=pd", 415, content_type="application/x-www-form-urlencoded"),
        Case("multipart", good(3), 415, content_type="multipart/form-data; boundary=x"),
        Case("charset latin-1", good(3), 415, content_type="application/json; charset=latin-1"),
        Case("charset utf-16", good(3), 415, content_type="application/json; charset=utf-16"),
        Case("encoding br", good(3), 415, headers={"Content-Encoding": "br"}),
        Case("encoding compress", good(3), 415, headers={"Content-Encoding": "compress"}),
        Case("encoding gzip, br", good(3), 415, headers={"Content-Encoding": "gzip, br"}),
        Case("gzip: not gzip at all", b"plain text" * 20, headers={"Content-Encoding": "gzip"}),
        Case(
            "gzip: truncated",
            gzip.compress(line(signal_record(3)) * 50)[:-30],
            headers={"Content-Encoding": "gzip"},
        ),
        Case(
            "gzip: bad CRC",
            bad_crc(gzip.compress(good(3))),
            headers={"Content-Encoding": "gzip"},
        ),
        Case(
            "gzip bomb (200 MiB inflated)",
            gzip_bomb(200 << 20),
            413,
            headers={"Content-Encoding": "gzip"},
        ),
        Case("over max_body, with Content-Length", over, 413),
        Case("over max_body, chunked", over * 3, 413, chunked=True),
        Case("one record over max_body", one_huge, 413),
        Case(
            "one NDJSON record over max_body among good lines",
            ndjson(good(4), one_huge, good(5)),
            413,
            content_type="application/x-ndjson",
        ),
        Case("Content-Length over max_body, no body sent", status=413, raw=head(MAX_BODY + 1)),
    ]


def test_every_limit_and_encoding_error_has_its_status_while_good_traffic_flows(
    make_daemon,
) -> None:
    daemon = make_daemon(FIREHOSE).start()
    cases = limit_cases()
    peak_before = proc_status(daemon, "VmHWM")
    problems = run_catalogue(daemon, cases, first_good=2_000_000)
    grown = proc_status(daemon, "VmHWM") - peak_before
    report("hostile limits", peak_rss_growth_kib=grown)
    if grown > 64 * 1024:
        problems.append(f"peak RSS grew by {grown} KiB: a body was held or inflated past max_body")
    stored = set(oids(delivered(daemon)))
    if stored & {1, 2, 3, 4, 5}:
        problems.append(f"records of refused requests were stored: {stored & {1, 2, 3, 4, 5}}")
    assert not problems, "\n".join(problems)


def pretty_array(*numbers: int) -> bytes:
    return json.dumps([signal_record(n) for n in numbers], indent=2).encode()


def huge_int_at(path: str, n: int) -> bytes:
    """A record of oid `n` whose `path` (dotted) holds a 5000-digit integer."""
    record: dict[str, Any] = signal_record(n)
    keys = path.split(".")
    record.pop(keys[0], None)
    text = json.dumps(record)[:-1] + ", "
    value = "9" * 5000
    for key in reversed(keys[1:]):
        value = f'{{"{key}": {value}}}'
    return f'{text}"{keys[0]}": {value}}}'.encode()


DUPLICATE_KEYS = b'{"type": "a", "signal_id": {"$oid": "%024x"}, "type": "b", "note": "dup"}' % 31
BIG_PAYLOAD = good(32)[:-1] + b', "quantity": -' + b"7" * 5000 + b"}"
NESTED_200 = good(33)[:-1] + b', "x": ' + deep_array(200) + b"}"


def record_cases() -> list[Case]:
    return [
        Case(
            "one bad NDJSON line",
            ndjson(good(10), b"this is not json", good(11)),
            202,
            content_type="application/x-ndjson",
            rejected=[1],
            accepted=2,
        ),
        Case(
            "a 100k-deep NDJSON line",
            ndjson(good(12), deep_object(DEEP), good(13)),
            202,
            content_type="application/x-ndjson",
            rejected=[1],
            accepted=2,
        ),
        Case(
            "a 100k-deep array as an NDJSON line",
            ndjson(deep_array(DEEP), good(14)),
            202,
            content_type="application/x-ndjson",
            rejected=[0],
            accepted=1,
        ),
        Case(
            "lone surrogate and NaN NDJSON lines",
            ndjson(good(15), b'{"type": "pd", "did": "\\ud800"}', b'{"type": "pd", "p": NaN}'),
            202,
            content_type="application/x-ndjson",
            rejected=[1, 2],
            accepted=1,
        ),
        Case(
            "NDJSON with CRLF line ends",
            good(16) + b"\r\n" + good(17) + b"\r\n",
            202,
            content_type="application/x-ndjson",
            accepted=2,
        ),
        Case("pretty-printed array", pretty_array(18, 19), 202, accepted=2),
        Case(
            "5000-digit integers in the time, id, session and person paths",
            b"["
            + b",".join(
                [
                    good(20),
                    huge_int_at("evdt", 90),
                    huge_int_at("evdt.$date", 91),
                    huge_int_at("signal_id", 92),
                    huge_int_at("signal_id.$oid", 93),
                    huge_int_at("did", 94),
                    huge_int_at("pid", 95),
                    good(21),
                ]
            )
            + b"]",
            202,
            rejected=[1, 2, 3, 4, 5, 6],
            accepted=2,
        ),
        Case("a 5000-digit integer elsewhere", BIG_PAYLOAD, 202, accepted=1),
        Case("duplicate keys", DUPLICATE_KEYS, 202, accepted=1),
        Case("a BOM before a JSON array", b"\xef\xbb\xbf[" + good(22) + b"]", 202, accepted=1),
        Case(
            "a BOM before NDJSON",
            b"\xef\xbb\xbf" + ndjson(good(23), good(24)),
            202,
            content_type="application/x-ndjson",
            accepted=2,
        ),
        Case("200-deep nesting in a record", NESTED_200, 202, accepted=1),
        Case(
            "1500 bad records and one good",
            b"[" + b",".join([b"1"] * 1500 + [good(25)]) + b"]",
            202,
            rejected=list(range(1000)),
            accepted=1,
        ),
    ]


def test_bad_records_are_rejected_by_index_and_the_rest_kept_verbatim(make_daemon) -> None:
    daemon = make_daemon(FIREHOSES).start()
    problems = run_catalogue(daemon, record_cases(), first_good=3_000_000)
    kept = {10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 31, 32, 33}
    try:
        wait_until(lambda: kept <= set(oids(delivered(daemon))))
    except AssertionError:
        problems.append(f"never delivered: {kept - set(oids(delivered(daemon)))}")
    lines = delivered_lines(daemon)
    for raw in lines:
        try:
            json.loads(raw, parse_int=str)
        except ValueError:
            problems.append(f"a delivered NDJSON line is not one JSON value: {raw[:120]!r}")
    for name, raw in {
        "duplicate keys": DUPLICATE_KEYS,
        "5000 digits": BIG_PAYLOAD,
        "200-deep": NESTED_200,
    }.items():
        if raw not in lines:
            problems.append(f"{name}: the delivered file does not hold the bytes as received")
    stored = set(oids(delivered(daemon)))
    if stored & set(range(90, 96)):
        problems.append(f"rejected records were stored: {stored & set(range(90, 96))}")
    # Duplicate keys: routed by the value every consumer reads (the last one, "b").
    try:
        wait_until(lambda: 31 in oids(delivered(daemon, "only_b/*.ndjson")))
    except AssertionError:
        problems.append("duplicate keys: the record did not reach the types=[b] firehose")
    if 31 in oids(delivered(daemon, "only_a/*.ndjson")):
        problems.append("duplicate keys: the record was routed as type 'a' too")
    assert not problems, "\n".join(problems)


# -- a body of millions of tiny records ----------------------------------------------


RECORDS = (2 << 20) - 1  # `[1,1,...,1]` just under 4 MiB


def test_millions_of_tiny_records_neither_stall_the_loop_nor_bloat_memory(make_daemon) -> None:
    """4 MiB of `[1,1,1,...]`: two million records, each rejected.

    The per-record loop runs on the event loop: it must yield to other requests (good
    clients stay under a second) and keep only the 1000 listed rejections (memory stays
    near the body's size, not hundreds of bytes per record).
    """
    base = BASE_CONFIG.replace('max_body = "1MiB"', 'max_body = "4MiB"')
    daemon = make_daemon(FIREHOSE, base=base).start()
    body = b"[" + b",".join([b"1"] * RECORDS) + b"]"
    peak_before = proc_status(daemon, "VmHWM")
    with GoodTraffic(daemon, 4_000_000, per_request=1) as traffic:
        time.sleep(0.3)  # the good traffic is flowing before the big body arrives
        started = time.monotonic()
        answer = daemon.post(body)
        took = time.monotonic() - started
        time.sleep(0.3)
    grown_mib = (proc_status(daemon, "VmHWM") - peak_before) / 1024
    report(
        "tiny records x2M",
        seconds=round(took, 2),
        peak_rss_growth_mib=round(grown_mib),
        **traffic.figures(),
    )
    assert answer.status_code == 400, answer.text
    payload = answer.json()
    assert len(payload["rejected"]) == 1000 and payload["rejected_total"] == RECORDS
    assert not traffic.failures
    assert max(traffic.latencies) < 1.0, f"good requests waited {max(traffic.latencies):.2f}s"
    assert grown_mib < 512, f"peak RSS grew by {grown_mib:.0f} MiB for a 4 MiB body"


# -- a body of countless gzip members -------------------------------------------------


EMPTY_MEMBER = gzip.compress(b"")  # 20 bytes: a whole gzip member that inflates to nothing


@pytest.mark.parametrize("mebibytes", [1, 10])
def test_countless_empty_gzip_members_are_refused_promptly_without_stalling_others(
    make_daemon, mebibytes: int
) -> None:
    """`cat empty.gz empty.gz ...` by the million: each member needs its own inflater.

    Inflating them must take time linear in the body (not a copy of the rest of the body
    per member), off the event loop, and stop at `MAX_GZIP_MEMBERS` with a 400 naming
    the limit; meanwhile good clients are answered fast.
    """
    base = BASE_CONFIG.replace('max_body = "1MiB"', 'max_body = "16MiB"')
    daemon = make_daemon(FIREHOSE, base=base).start()
    body = EMPTY_MEMBER * ((mebibytes << 20) // len(EMPTY_MEMBER))
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }
    with GoodTraffic(daemon, 5_000_000 + 100_000 * mebibytes, per_request=1) as traffic:
        time.sleep(0.3)  # the good traffic is flowing before the members arrive
        started = time.monotonic()
        try:
            answer = Answer.of(
                daemon.session.post(
                    f"{daemon.url}{SIGNALS}", data=body, headers=headers, timeout=10
                )
            )
        except requests.Timeout:
            answer = Answer(0, "", b"no answer within 10 s")
        took = time.monotonic() - started
        time.sleep(0.3)
    report(f"empty gzip members, {mebibytes} MiB", seconds=round(took, 2), **traffic.figures())
    assert answer.status == 400, answer
    assert "gzip members" in answer.json()["error"], answer
    assert took < 2.0, f"answered after {took:.2f}s"
    assert not traffic.failures, traffic.failures
    assert max(traffic.latencies) < 1.0, f"good requests waited {max(traffic.latencies):.2f}s"
    assert daemon.get("/healthz").status_code == 200


def test_a_body_of_many_small_gzip_members_is_accepted_whole(make_daemon) -> None:
    """Up to `MAX_GZIP_MEMBERS` members are one body (`cat a.gz b.gz`, one member per
    record): every record is accepted and delivered."""
    daemon = make_daemon(FIREHOSE).start()
    count = 1000
    body = b"".join(gzip.compress(line(signal_record(n))) for n in range(count))
    answer = daemon.post(
        body, content_type="application/x-ndjson", headers={"Content-Encoding": "gzip"}
    )
    assert answer.status_code == 202, answer.text
    assert answer.json()["accepted"] == count
    wait_until(lambda: sorted(oids(delivered(daemon))) == list(range(count)))


# -- slow and idle clients -----------------------------------------------------------


SLOW_HEAD = f"POST {SIGNALS} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".encode()


def connect_paced(daemon: Daemon, count: int) -> list[socket.socket]:
    """`count` connections the daemon has accepted, opened in waves it can keep up with
    (a burst past the listen backlog only measures SYN retransmission)."""
    base = open_fds(daemon)
    socks: list[socket.socket] = []
    while len(socks) < count:
        for _ in range(min(100, count - len(socks))):
            socks.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=10))
        wait_until(lambda: open_fds(daemon) >= base + len(socks), timeout=30, interval=0.005)
    return socks


def readable(sock: socket.socket) -> bool:
    """Whether `sock` has data or an EOF to read now (poll: fds past 1024 are fine)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (EOF or reset); never blocks."""
    if not readable(sock):
        return False
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BlockingIOError):
        return True


def trickle(sock: socket.socket, data: bytes) -> bool:
    """Send `data`; False when the server has closed the connection."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


@contextlib.contextmanager
def closing_all(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_slow_senders_do_not_starve_good_clients(make_daemon) -> None:
    daemon = make_daemon(FIREHOSE).start()
    latencies: list[float] = []
    with closing_all(connect_paced(daemon, 400)) as socks:
        heads, bodies = socks[:200], socks[200:]
        for sock in heads:
            sock.sendall(SLOW_HEAD)
        for sock in bodies:
            sock.sendall(head(100_000))
        for tick in range(8):
            for sock in socks:
                trickle(sock, b"x" if sock in heads else b" ")
            started = time.monotonic()
            response = daemon.post([signal_record(tick)])
            latencies.append(time.monotonic() - started)
            assert response.status_code == 202, response.text
            time.sleep(0.4)  # the slow clients' pace: one byte each per tick
        # an unauthenticated slow body is refused at once, before its body is read
        with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
            sock.sendall(head(100_000, token=None) + b"[")
            answer = read_answer(sock, 3)
        assert answer is not None and answer.status == 401
    report("slow senders x400", good_max_ms=round(1000 * max(latencies), 1))
    assert max(latencies) < 1.0
    wait_until(lambda: oids(delivered(daemon)) == list(range(8)))


IDLE_TIMEOUT = 2.0


def test_connections_sending_no_complete_request_are_closed_after_idle_timeout(
    make_daemon,
) -> None:
    """Proposed `server.idle_timeout`: a connection that has not sent a complete request
    head within it (from its opening, or from its last response) is closed: idle
    keep-alive, silent, and slowloris connections alike. (aiohttp: `keepalive_timeout`.)
    """
    base = with_server_keys(idle_timeout=f"{IDLE_TIMEOUT:g}s", body_timeout="5s")
    daemon = make_daemon(FIREHOSE, base=base).start()
    fds_before = open_fds(daemon)
    with closing_all(connect_paced(daemon, 60)) as socks:
        opened = time.monotonic()
        silent, slowloris, kept_alive = socks[:20], socks[20:40], socks[40:]
        for sock in slowloris:
            sock.sendall(SLOW_HEAD)
        for sock in kept_alive:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = read_answer(sock, 5)
            assert answer is not None and answer.status == 200
        closed_at: dict[int, float] = {}
        posted = 0
        deadline = opened + IDLE_TIMEOUT + 4
        while len(closed_at) < len(socks) and time.monotonic() < deadline:
            for sock in socks:
                if sock.fileno() in closed_at:
                    continue
                alive = sock not in slowloris or trickle(sock, b"x")
                if not alive or closed_by_peer(sock):
                    closed_at[sock.fileno()] = time.monotonic() - opened
            posted += 1
            assert daemon.post([signal_record(posted)]).status_code == 202
            time.sleep(0.25)
        kinds = {"silent": silent, "slowloris": slowloris, "idle keep-alive": kept_alive}
        open_after = {k: sum(s.fileno() not in closed_at for s in v) for k, v in kinds.items()}
    report(
        "idle timeout", still_open=open_after, first_close_s=min(closed_at.values(), default=None)
    )
    assert not any(open_after.values()), f"still open {IDLE_TIMEOUT + 4:g}s on: {open_after}"
    assert min(closed_at.values()) >= IDLE_TIMEOUT - 0.5, "closed before idle_timeout"
    wait_until(lambda: open_fds(daemon) <= fds_before + 1)


BODY_TIMEOUT = 2.0


def test_a_body_slower_than_body_timeout_is_a_408_and_the_connection_closed(
    make_daemon,
) -> None:
    """Proposed `server.body_timeout`: the whole body must arrive within it, else 408
    with a JSON error, the connection is closed, and nothing is stored. A slow body that
    does arrive in time is accepted."""
    base = with_server_keys(idle_timeout="30s", body_timeout=f"{BODY_TIMEOUT:g}s")
    daemon = make_daemon(FIREHOSE, base=base).start()
    body = json.dumps([signal_record(1)]).encode()
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(head(len(body) + 1000))
        started = time.monotonic()
        answer = None
        while answer is None and time.monotonic() - started < BODY_TIMEOUT + 3:
            trickle(sock, b" ")
            answer = read_answer(sock, 0.25) if readable(sock) else None
            time.sleep(0.1 if answer is None else 0)
        answered = time.monotonic() - started
        assert answer is not None, f"no answer {answered:.1f}s into a trickled body"
        assert answer.status == 408, answer
        assert isinstance(answer.json().get("error"), str)
        closed = wait_until(lambda: not trickle(sock, b" ") or closed_by_peer(sock), timeout=5)
        assert closed
    report("body timeout", answered_after_s=round(answered, 2))
    assert BODY_TIMEOUT - 0.5 <= answered <= BODY_TIMEOUT + 2
    # a slow body arriving within body_timeout is still accepted
    in_time = json.dumps([signal_record(2)]).encode()
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(head(len(in_time)))
        for i in range(0, len(in_time), len(in_time) // 4 + 1):
            sock.sendall(in_time[i : i + len(in_time) // 4 + 1])
            time.sleep(BODY_TIMEOUT / 8)
        late = read_answer(sock, 5)
    assert late is not None and late.status == 202, late
    wait_until(lambda: oids(delivered(daemon)) == [2])


IDLE_CONNECTIONS = 10_000


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Room for IDLE_CONNECTIONS sockets here and in the daemon (which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = IDLE_CONNECTIONS + 500
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}: raise `ulimit -Hn`")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_ten_thousand_idle_connections_neither_block_a_client_nor_leak_fds(
    make_daemon, many_fds: None
) -> None:
    daemon = make_daemon(FIREHOSE).start()
    fds_before, rss_before = open_fds(daemon), proc_status(daemon, "VmRSS")
    started = time.monotonic()
    with closing_all(connect_paced(daemon, IDLE_CONNECTIONS)):
        opening = time.monotonic() - started
        held = open_fds(daemon) - fds_before
        latencies = []
        for n in range(5):
            started = time.monotonic()
            response = daemon.post([signal_record(n)])
            latencies.append(time.monotonic() - started)
            assert response.status_code == 202, response.text
        rss_held = proc_status(daemon, "VmRSS")
        started = time.monotonic()
    wait_until(lambda: open_fds(daemon) <= fds_before + 1, timeout=30)
    released = time.monotonic() - started
    report(
        "10k idle connections",
        open_s=round(opening, 2),
        daemon_fds=f"{fds_before}->{fds_before + held}->{open_fds(daemon)}",
        good_max_ms=round(1000 * max(latencies), 1),
        rss_mib=f"{rss_before // 1024}->{rss_held // 1024}",
        release_s=round(released, 2),
    )
    assert held >= IDLE_CONNECTIONS
    assert max(latencies) < 1.0, latencies
    wait_until(lambda: oids(delivered(daemon)) == list(range(5)))
