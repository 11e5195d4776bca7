"""The HTTP API of DESIGN.md §5, row by row, against a real `firehosed run` process."""

from __future__ import annotations

import gzip
import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import BASE_CONFIG, TOKEN, Daemon, signal_record, wait_until

MAX_BODY = 1 << 20  # BASE_CONFIG's max_body = "1MiB"


def firehose(name: str = "files", **keys: Any) -> str:
    """A `[firehoses.NAME]` table for account acme: NDJSON into `local`, cut every 0.6 s."""
    table = {
        "account": "acme",
        "channel": "local",
        "format": "ndjson",
        "minutes_between_files": 0.01,
        **keys,
    }
    return f"\n[firehoses.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())


def oids(records: list[dict[str, Any]]) -> list[int]:
    """The numbers `signal_record(n)` put in each record's id, in order."""
    return [int(r["signal_id"]["$oid"], 16) for r in records]


def assert_json_error(response: requests.Response, status: int) -> dict[str, Any]:
    """`response` has `status` and a JSON body whose `error` is a non-empty string."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    payload: dict[str, Any] = response.json()
    assert isinstance(payload.get("error"), str) and payload["error"]
    return payload


def rss_kib(daemon: Daemon) -> int:
    """The daemon's resident set size, from /proc/<pid>/status."""
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def metric_samples(daemon: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics, keyed by (sample name, labels)."""
    response = daemon.admin("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def broken_channel(daemon: Daemon, name: str = "broken") -> str:
    """A directory channel under a regular FILE, so every delivery fails (even as root)."""
    (daemon.root / "blocker").write_text("a file where a directory should be")
    return f'\n[channels.{name}]\ntype = "directory"\npath = "{daemon.root}/blocker/sub"\n'


# -- 202 -------------------------------------------------------------------------------


BODIES = {
    "object": (json.dumps(signal_record(1)), "application/json", [1]),
    "array": (json.dumps([signal_record(1), signal_record(2)]), "application/json", [1, 2]),
    "ndjson": (
        "".join(json.dumps(signal_record(n)) + "\n" for n in (1, 2, 3)),
        "application/x-ndjson",
        [1, 2, 3],
    ),
}


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("form", list(BODIES))
def test_202_for_every_body_form(make_daemon, form: str, gzipped: bool) -> None:
    body, content_type, expected = BODIES[form]
    daemon = make_daemon(firehose()).start()
    response = daemon.post(body, content_type=content_type, gzip=gzipped)
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": len(expected), "duplicates": 0, "rejected": []}
    wait_until(lambda: oids(daemon.delivered()) == expected)


def test_202_lists_rejected_records_and_keeps_the_rest(make_daemon) -> None:
    daemon = make_daemon(firehose()).start()
    body = [signal_record(1), "not an object", signal_record(3), signal_record(4, kind="")]
    response = daemon.post(body)
    assert response.status_code == 202, response.text
    payload = response.json()
    assert payload["accepted"] == 2
    assert payload["duplicates"] == 0
    assert [r["index"] for r in payload["rejected"]] == [1, 3]
    assert all(isinstance(r["error"], str) and r["error"] for r in payload["rejected"])
    wait_until(lambda: oids(daemon.delivered()) == [1, 3])


def test_a_retried_request_is_202_with_duplicates_and_stored_once(make_daemon) -> None:
    daemon = make_daemon(firehose()).start()
    body = [signal_record(1), signal_record(2)]
    assert daemon.post(body).json() == {"accepted": 2, "duplicates": 0, "rejected": []}
    retry = daemon.post(body)
    assert retry.status_code == 202, retry.text
    assert retry.json() == {"accepted": 0, "duplicates": 2, "rejected": []}
    wait_until(lambda: len(daemon.delivered()) == 2)
    # after delivery too, and a half-new retry keeps only its new record
    partly_new = daemon.post([signal_record(2), signal_record(3)])
    assert partly_new.json() == {"accepted": 1, "duplicates": 1, "rejected": []}
    wait_until(lambda: 3 in oids(daemon.delivered()))
    assert Counter(oids(daemon.delivered())) == {1: 1, 2: 1, 3: 1}


# -- 400 -------------------------------------------------------------------------------


def test_400_for_a_body_that_does_not_parse(make_daemon) -> None:
    daemon = make_daemon(firehose()).start()
    payload = assert_json_error(daemon.post('[{"type": "pd"},'), 400)
    assert "accepted" not in payload


def test_400_when_every_record_is_rejected(make_daemon) -> None:
    daemon = make_daemon(firehose()).start()
    payload = assert_json_error(daemon.post([{"type": "a.b"}, {"no": "type"}, 7]), 400)
    assert [r["index"] for r in payload["rejected"]] == [0, 1, 2]
    assert all(r["error"] for r in payload["rejected"])
    assert daemon.status()["firehoses"]["files"]["queued_records"] == 0


# -- 401 -------------------------------------------------------------------------------


def test_401_is_the_same_answer_for_every_kind_of_bad_credential(make_daemon) -> None:
    other = '\n[accounts.other]\ntokens = ["other-token"]\n'
    daemon = make_daemon(firehose() + other).start()
    record = [signal_record(1)]
    answers = {
        "missing token": daemon.post(record, token=None),
        "wrong token": daemon.post(record, token="wrong-token"),
        "other account's token": daemon.post(record, token="other-token"),
        "unknown account": daemon.post(record, account="nobody"),
        "unknown account, bad body": daemon.post(b"{{{", account="nobody"),
        "not a bearer": daemon.post(record, token=None, headers={"Authorization": TOKEN}),
    }
    bodies = {name: assert_json_error(r, 401) for name, r in answers.items()}
    assert len({json.dumps(b, sort_keys=True) for b in bodies.values()}) == 1, bodies
    assert daemon.status()["firehoses"]["files"]["queued_records"] == 0
    assert daemon.post(record, token="other-token", account="other").status_code == 202


# -- 413 -------------------------------------------------------------------------------


def padded_array(size: int) -> bytes:
    """A JSON array of one valid record, padded with spaces to exactly `size` bytes."""
    core = json.dumps([signal_record(1)]).encode()
    return core[:-1] + b" " * (size - len(core)) + b"]"


def test_a_body_of_exactly_max_body_is_accepted(make_daemon) -> None:
    daemon = make_daemon(firehose()).start()
    response = daemon.post(padded_array(MAX_BODY))
    assert response.status_code == 202, response.text


def test_413_for_a_body_over_max_body(make_daemon) -> None:
    daemon = make_daemon(firehose()).start()
    assert_json_error(daemon.post(padded_array(MAX_BODY + 1)), 413)


def test_413_for_a_chunked_body_over_max_body(make_daemon) -> None:
    """No Content-Length to refuse early: the limit holds while the body streams in."""
    daemon = make_daemon(firehose()).start()
    data = padded_array(3 * MAX_BODY)
    chunks = (data[i : i + 65536] for i in range(0, len(data), 65536))
    response = daemon.session.post(
        f"{daemon.url}/v1/accounts/acme/signals",
        data=chunks,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert "Content-Length" not in response.request.headers
    assert_json_error(response, 413)


def test_413_for_a_gzip_bomb_without_inflating_it(make_daemon) -> None:
    daemon = make_daemon(firehose()).start()
    bomb = gzip.compress(padded_array(50_000_000), compresslevel=9)
    assert len(bomb) < MAX_BODY // 4
    before = rss_kib(daemon)
    for _ in range(3):
        assert_json_error(daemon.post(bomb, gzip=False, headers={"Content-Encoding": "gzip"}), 413)
    grown = rss_kib(daemon) - before
    assert grown < 20_000, f"RSS grew by {grown} KiB: the bomb was inflated"
    assert daemon.post([signal_record(2)]).status_code == 202


def test_a_gzip_body_inflating_just_past_max_body_is_413(make_daemon) -> None:
    daemon = make_daemon(firehose()).start()
    body = gzip.compress(padded_array(MAX_BODY + 1))
    assert_json_error(daemon.post(body, headers={"Content-Encoding": "gzip"}), 413)
    inside = gzip.compress(padded_array(MAX_BODY))
    response = daemon.post(inside, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 202, response.text


# -- 415 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "encoding"),
    [
        ("text/plain", None),
        ("application/xml", None),
        ("application/json; charset=latin-1", None),
        ("application/json", "br"),
        ("application/json", "deflate, gzip"),
    ],
)
def test_415_for_an_unsupported_type_or_encoding(
    make_daemon, content_type: str, encoding: str | None
) -> None:
    daemon = make_daemon(firehose()).start()
    headers = {"Content-Encoding": encoding} if encoding else {}
    response = daemon.post([signal_record(1)], content_type=content_type, headers=headers)
    assert_json_error(response, 415)
    assert daemon.status()["firehoses"]["files"]["queued_records"] == 0


# -- 503 -------------------------------------------------------------------------------


def test_503_with_retry_after_while_draining(make_daemon) -> None:
    """A destination that keeps failing holds the drain open until drain_timeout."""
    base = BASE_CONFIG.replace('drain_timeout = "10s"', 'drain_timeout = "4s"')
    daemon = make_daemon(base=base)
    daemon.write_config(broken_channel(daemon) + firehose(channel="broken"), base=base)
    daemon.start()
    assert daemon.post([signal_record(1)]).status_code == 202
    wait_until(lambda: daemon.status()["firehoses"]["files"]["last_error"])
    daemon.signal(signal.SIGTERM)
    # a Response is falsy when not ok: wrap it so wait_until sees a truthy value
    (ready,) = wait_until(lambda: (r := daemon.get("/readyz")).status_code == 503 and [r])
    assert int(ready.headers["Retry-After"]) > 0
    refused = daemon.post([signal_record(2)])
    assert_json_error(refused, 503)
    assert int(refused.headers["Retry-After"]) > 0
    assert daemon.get("/healthz").status_code == 200
    assert daemon.stop(timeout=15) == 0


def test_503_with_retry_after_when_storage_is_over_max_disk(make_daemon) -> None:
    base = BASE_CONFIG.replace('dir = "{dir}/var"', 'dir = "{dir}/var"\nmax_disk = "1KiB"')
    daemon = make_daemon(firehose(paused=True), base=base).start()
    accepted = 0
    for n in range(100):
        response = daemon.post([signal_record(n, note="x" * 100)])
        if response.status_code != 202:
            break
        accepted += 1
    assert_json_error(response, 503)
    assert int(response.headers["Retry-After"]) > 0
    assert 0 < accepted < 100
    assert daemon.get("/readyz").status_code == 503
    # refused, never dropped: everything acknowledged is still queued
    assert daemon.status()["firehoses"]["files"]["queued_records"] == accepted


# -- health, readiness, metrics, status ------------------------------------------------


def test_healthz_and_readyz(make_daemon) -> None:
    daemon = make_daemon(firehose()).start()
    health = daemon.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = daemon.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


def test_metrics_count_signals_queues_and_fsyncs(make_daemon) -> None:
    daemon = make_daemon(firehose(paused=True) + firehose("purchases", types=["t"])).start()
    assert daemon.post([signal_record(n) for n in range(3)]).status_code == 202
    assert daemon.post([signal_record(n, kind="t") for n in range(3, 5)]).status_code == 202
    assert daemon.post([signal_record(4, kind="t"), {"type": ""}]).status_code == 202
    samples = metric_samples(daemon)
    acme = frozenset({("account", "acme")})
    assert samples[("firehosed_signals_accepted_total", acme)] == 5
    assert samples[("firehosed_signals_duplicate_total", acme)] == 1
    assert samples[("firehosed_signals_rejected_total", acme)] == 1
    assert samples[("firehosed_queue_records", frozenset({("firehose", "files")}))] == 5
    assert samples[("firehosed_queue_bytes", frozenset({("firehose", "files")}))] > 0
    assert ("firehosed_queue_oldest_age_seconds", frozenset({("firehose", "files")})) in samples
    wait_until(
        lambda: (
            metric_samples(daemon)[
                ("firehosed_queue_records", frozenset({("firehose", "purchases")}))
            ]
            == 0
        )
    )
    assert samples[("firehosed_fsync_seconds_count", frozenset())] >= 1
    assert samples[("firehosed_fsync_seconds_bucket", frozenset({("le", "+Inf")}))] >= 1


def test_status_of_a_paused_firehose_shows_its_backlog(make_daemon) -> None:
    daemon = make_daemon(firehose(paused=True)).start()
    assert daemon.post([signal_record(n) for n in range(4)]).status_code == 202
    status = daemon.status()["firehoses"]["files"]
    assert status["paused"] is True
    assert status["queued_records"] == 4
    assert status["queued_bytes"] > 0
    assert status["last_delivery"] is None
    assert status["last_error"] is None
    wait_until(lambda: daemon.status()["firehoses"]["files"]["oldest_queued_age_seconds"] > 0.5)


def test_status_shows_the_last_delivery(make_daemon) -> None:
    daemon = make_daemon(firehose()).start()
    assert daemon.post([signal_record(1)]).status_code == 202
    delivery = wait_until(lambda: daemon.status()["firehoses"]["files"]["last_delivery"])
    assert [p.name for p in daemon.files()] == [delivery["batch"]]
    assert delivery["time"]
    status = daemon.status()["firehoses"]["files"]
    assert status["queued_records"] == 0
    assert status["paused"] is False
    assert status["last_error"] is None


def test_status_shows_the_last_error(make_daemon) -> None:
    daemon = make_daemon()
    daemon.write_config(broken_channel(daemon) + firehose(channel="broken"))
    daemon.start()
    assert daemon.post([signal_record(1), signal_record(2)]).status_code == 202
    error = wait_until(lambda: daemon.status()["firehoses"]["files"]["last_error"])
    assert error["error"] and error["time"]
    status = daemon.status()["firehoses"]["files"]
    assert status["queued_records"] == 2
    assert status["last_delivery"] is None


def test_unknown_path_is_a_json_404(make_daemon) -> None:
    daemon = make_daemon(firehose()).start()
    assert_json_error(daemon.get("/v2/nothing"), 404)


def test_wrong_method_is_a_json_405_naming_the_allowed_one(make_daemon) -> None:
    daemon = make_daemon(firehose()).start()
    response = daemon.get("/v1/accounts/acme/signals")
    assert_json_error(response, 405)
    assert "POST" in response.headers.get("Allow", "")


def test_routes_by_method_and_path_as_the_contract_lists_them(make_daemon) -> None:
    """The receiver routes requests itself: HEAD answers like GET without a body, a GET
    route names GET and HEAD in Allow, near-miss paths are 404, and an account segment is
    percent-decoded (an encoded slash stays inside it: an unknown account, 401)."""
    daemon = make_daemon(firehose()).start()
    url = daemon.url
    head = daemon.session.head(f"{url}/healthz", timeout=10)
    assert head.status_code == 200 and head.content == b""
    response = daemon.session.post(f"{url}/readyz", timeout=10)
    assert_json_error(response, 405)
    assert response.headers["Allow"] == "GET,HEAD"
    for path in ("/healthz/", "/v1/accounts//signals", "/v1/accounts/acme/signals/x", "/"):
        assert_json_error(daemon.session.post(f"{url}{path}", timeout=10), 404)
    assert daemon.post(signal_record(1), account="%61cme").status_code == 202
    assert_json_error(daemon.post(signal_record(2), account="ac%2Fme"), 401)


def test_a_gzip_body_of_several_members_keeps_every_record(make_daemon) -> None:
    """RFC 1952: a gzip stream is a series of members (what `cat a.gz b.gz` or pigz gives)."""
    daemon = make_daemon(firehose()).start()
    members = b"".join(
        gzip.compress(json.dumps(signal_record(n)).encode() + b"\n") for n in (1, 2, 3)
    )
    response = daemon.post(
        members, content_type="application/x-ndjson", headers={"Content-Encoding": "gzip"}
    )
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 3, "duplicates": 0, "rejected": []}
    wait_until(lambda: oids(daemon.delivered()) == [1, 2, 3])
