"""A request's records are read, deduped and routed as a whole: the result must be the
one of reading and routing them one by one.

The receiver reads a request's envelopes in one msgspec call and routes runs of records
as single blocks; a request with anything irregular is read record by record. These
tests hold both paths to the same answers, record for record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from firehosed.catchup import CatchUp
from firehosed.config import CatchUpConfig, FirehoseConfig
from firehosed.dedupe import Dedupe
from firehosed.envelope import EnvelopeReader, Envelopes
from firehosed.fields import FieldsConfig
from firehosed.firehose import Firehose
from firehosed.queue.base import Ticket
from firehosed.queue.commit import Committer
from firehosed.queue.local import LocalQueue
from firehosed.queue.store import SegmentStore
from firehosed.router import AccountRoutes, Router, Routing

NOW = 1_767_225_600.0


def signal(n: int, **fields: Any) -> bytes:
    body: dict[str, Any] = {"type": "pd", "signal_id": {"$oid": f"id{n}"}, "n": n}
    body.update(fields)
    return msgspec.json.encode({k: v for k, v in body.items() if v is not None})


def one_by_one(reader: EnvelopeReader, raws: list[bytes]) -> tuple[Envelopes, list[int]]:
    """What reading each record alone gives (the record-by-record path)."""
    envs, rejected = Envelopes.empty(), []
    for index, raw in enumerate(raws):
        got, why = reader.read_all([raw], NOW)
        if why:
            rejected.append(index)
        elif got.assigned is not None and got.assigned[0]:
            got.ids[0] = "<assigned>"
            envs.append(reader.read(raw, NOW), raw)
            envs.ids[-1] = "<assigned>"
        else:
            envs.append(reader.read(raw, NOW), raw)
    return envs, rejected


def whole(reader: EnvelopeReader, raws: list[bytes]) -> tuple[Envelopes, list[int]]:
    envs, rejected = reader.read_all(raws, NOW)
    if envs.assigned is not None:
        envs.ids = [
            "<assigned>" if assigned else ident
            for ident, assigned in zip(envs.ids, envs.assigned, strict=True)
        ]
    return envs, [index for index, _ in rejected]


def columns(envs: Envelopes) -> tuple[list[Any], ...]:
    return (envs.types, envs.ids, envs.sessions, envs.persons, envs.times, envs.raws)


REGULAR = [
    signal(1, evdt={"$date": "2026-01-01T00:00:00.125Z"}, did="s1", pid="p1"),
    signal(2, evdt={"$date": "2026-01-01T01:00:00+01:00"}, did=7, pid=""),
    signal(3, evdt={"$date": "2026-01-01T00:00:00"}),  # naive: UTC
    signal(4, evdt=1767225600000),  # epoch milliseconds, plain
    signal(5, signal_id="plain-id", evdt="2026-01-01T00:00:00Z"),
    signal(6, signal_id=12345678901234567890),  # an integer id, no time
    signal(7, type="other", did="s2"),
    msgspec.json.format(signal(8, did="s3"), indent=2),  # pretty, as inside an array
]


@pytest.mark.parametrize(
    "raws",
    [
        REGULAR,
        [*REGULAR, signal(9, signal_id=None)],  # an id assigned
        [*REGULAR, signal(10, evdt="2026-01-01")],  # a time only Python parses
        [*REGULAR, signal(11, evdt="yesterday")],  # rejected
        [*REGULAR, signal(12, type="a.b")],  # rejected type
        [*REGULAR, signal(13, signal_id="x" * 300)],  # id over its limit
        [*REGULAR, signal(14, pid="p" * 300)],  # person over its limit
        [*REGULAR, signal(15, evdt=True)],  # a boolean time
        [*REGULAR, b'{"type":"pd","a":1,', b'"b":2}', b'{"type":"pd"} {"type":"pd"}'],
        [*REGULAR, b'{"signal_id":{"$oid":"no-type"}}'],
        [*REGULAR, b"[1,2]", b"{}"],
        [b'{"type":"pd"}\r', b'  {"type":"pd"}'],  # CRLF line, indented line
    ],
)
def test_a_whole_request_reads_as_its_records_one_by_one(raws: list[bytes]) -> None:
    reader = EnvelopeReader(FieldsConfig())
    fast, fast_rejected = whole(reader, raws)
    slow, slow_rejected = one_by_one(EnvelopeReader(FieldsConfig()), raws)
    assert fast_rejected == slow_rejected
    assert columns(fast) == columns(slow)


def test_records_cut_across_lines_are_rejected_not_joined() -> None:
    """`decode_lines` would read `{"a":1,` + newline + `"b":2}` as one object and a line
    of two objects as two: the counts agree, the records would not."""
    raws = [b'{"type":"pd","a":1,', b'"b":2}', b'{"type":"pd"} {"type":"pd"}']
    envs, rejected = EnvelopeReader(FieldsConfig()).read_all(raws, NOW)
    assert len(envs) == 0 and [index for index, _ in rejected] == [0, 1, 2]


def test_dedupe_admits_a_request_as_seen_would_one_by_one() -> None:
    ids = [f"id{n}" for n in range(20)]
    bulk, single = Dedupe(60.0, 15, 1 << 20), Dedupe(60.0, 15, 1 << 20)
    ticket = Ticket()
    assert bulk.admit(ids, NOW, ticket) == []
    assert [i for i, one in enumerate(ids) if single.seen(one, NOW, ticket)] == []
    assert len(bulk) == len(single) == 15 and bulk.memory == single.memory
    again = ["id19", "new1", "new1", "id0"]  # id0 was dropped by the count limit
    assert bulk.admit(again, NOW, ticket) == [0, 2]
    assert [i for i, one in enumerate(again) if single.seen(one, NOW, ticket)] == [0, 2]
    assert bulk.original("new1") is ticket


Queued = dict[str, list[tuple[str, str, str | None, bytes]]]


class Pipeline:
    """One account routing to a catch-up firehose (anonymous included, `pi` sent) and a
    firehose of identified `pd` signals only, each over a real segment store."""

    def __init__(self, root: Path) -> None:
        self.router = Router(CatchUp(CatchUpConfig()))
        self.reader = EnvelopeReader(FieldsConfig())
        committer = Committer("fsync")
        self.stores: dict[str, SegmentStore] = {}
        firehoses = []
        for name, keys in (
            ("all", {"catch_up": True, "include_anonymous": True, "send_person_identified": True}),
            ("pd", {"types": ["pd"], "include_anonymous": False}),
        ):
            store = self.stores[name] = SegmentStore(root / name, name, 1 << 20, sync=False)
            store.open()
            config = FirehoseConfig(account="acme", channel="c", **keys)
            firehoses.append(Firehose(name, config, LocalQueue(store, committer, root), None))
        self.router.accounts["acme"] = AccountRoutes(FieldsConfig(), firehoses)

    def post(self, raws: list[bytes]) -> Routing:
        """Route `raws` as one request; its routing (to roll back)."""
        envs, rejected = self.reader.read_all(raws, NOW)
        assert not rejected
        routing = self.router.begin("acme", Ticket())
        routing.route(envs, NOW)
        return routing

    def queued(self) -> Queued:
        """Each firehose's staged records: (type, id, person, raw), in order."""
        out = {}
        for name, store in self.stores.items():
            pending = store.take_pending()
            store.committed = store.write(pending, sync=False)
            store.settle(pending, store.committed)
            records, _, _ = store.read(1 << 62, 1 << 62)
            out[name] = [(r.type, r.id, r.person, r.raw) for r in records]
        return out


def routed_both_ways(tmp_path: Path, records: list[bytes], split: list[int]) -> Queued:
    """What the firehoses hold after `records` are posted one per request, checked to
    be what they hold after the same records are posted in requests of `split` sizes."""
    one_each = Pipeline(tmp_path / "one")
    for raw in records:
        one_each.post([raw])
    grouped = Pipeline(tmp_path / "grouped")
    start = 0
    for size in split:
        grouped.post(records[start : start + size])
        start += size
    expected = one_each.queued()
    assert grouped.queued() == expected
    return expected


SESSIONS = [
    signal(1, did="s1"),  # anonymous: buffered
    signal(2, did="s1", type="view"),
    signal(3, did="s2", pid="p2"),  # identified at once
    signal(4, did="s1", pid="p1"),  # identifies s1: its ring replayed before it, then pi
    signal(5, did="s1"),  # anonymous again: gets p1
    signal(6),  # no session
    signal(7, did="s2", pid="p2"),
    signal(8, did="s3", pid="p3", type="view"),
]


@pytest.mark.parametrize("split", [[8], [3, 5], [1] * 8, [4, 4]])
def test_routing_a_request_whole_is_routing_its_records_one_by_one(
    tmp_path: Path, split: list[int]
) -> None:
    """Catch-up replays, `pi` records, persons given to later signals and type filters
    come out the same, in the same order, however the records are grouped in requests."""
    expected = routed_both_ways(tmp_path, SESSIONS, split)
    assert [record_id for _, record_id, _, _ in expected["all"]] == [
        *("id1", "id2"),  # anonymous
        *("id3-pi", "id3"),  # s2 identified: nothing buffered, a pi
        *("id1", "id2", "id4-pi", "id4"),  # s1 identified: its ring again, a pi
        *("id5", "id6", "id7"),
        *("id8-pi", "id8"),
    ]
    assert [record_id for _, record_id, _, _ in expected["pd"]] == ["id3", "id4", "id5", "id7"]
    replayed = [person for kind, _, person, _ in expected["all"][4:6]]
    assert replayed == ["p1", "p1"] and expected["all"][7][2] == "p1"


IDENTIFIED = [
    signal(1, did="s1", pid="p1"),
    signal(2, did="s1", pid="p1", type="view"),  # another type: not for firehose pd
    signal(3, did="s2", pid="p2"),
    signal(4, pid="p4"),  # no session
    signal(5, did="s1", pid="p1"),
]


@pytest.mark.parametrize("split", [[5], [2, 3], [1] * 5])
def test_identified_records_of_several_types_route_as_one_by_one(
    tmp_path: Path, split: list[int]
) -> None:
    """Every record names its person (the path that identifies sessions up front): runs
    split where the types' firehoses differ, and a pi goes before each first signal."""
    expected = routed_both_ways(tmp_path, IDENTIFIED, split)
    assert [record_id for _, record_id, _, _ in expected["all"]] == [
        *("id1-pi", "id1", "id2", "id3-pi", "id3", "id4", "id5")
    ]
    assert [record_id for _, record_id, _, _ in expected["pd"]] == ["id1", "id3", "id4", "id5"]


RINGS = [
    signal(1, did="s1"),  # anonymous: buffered
    signal(2, did="s2"),
    signal(3, did="s2", pid="p2"),  # from here every record names its person
    signal(4, did="s1", pid="p1"),
    signal(5, did="s1", pid="p1"),
]


@pytest.mark.parametrize("split", [[2, 3], [1, 1, 3], [5]])
def test_identified_requests_replay_the_rings_earlier_requests_buffered(
    tmp_path: Path, split: list[int]
) -> None:
    """A request whose records all name their person identifies its sessions up front;
    each session's ring, buffered by an earlier request, goes before its first record."""
    expected = routed_both_ways(tmp_path, RINGS, split)
    assert [record_id for _, record_id, _, _ in expected["all"]] == [
        *("id1", "id2"),
        *("id2", "id3-pi", "id3"),  # s2's ring, its pi, the record
        *("id1", "id4-pi", "id4", "id5"),
    ]


def test_a_request_not_kept_leaves_its_sessions_as_they_were(tmp_path: Path) -> None:
    """Rolled back (its 503), a request that identified sessions leaves them anonymous
    with their rings: the client's retry identifies them again and replays the rings."""
    pipeline = Pipeline(tmp_path)
    pipeline.post(RINGS[:2])
    pipeline.post(RINGS[2:]).rollback()
    catch_up = pipeline.router.catch_up
    assert catch_up.person_of("acme", "s1", NOW) is None
    assert catch_up.person_of("acme", "s2", NOW) is None
    retried = Pipeline(tmp_path / "retried")
    retried.post(RINGS[:2])
    retried.post(RINGS[2:])
    pipeline.post(RINGS[2:])
    assert pipeline.queued()["all"][-7:] == retried.queued()["all"][-7:]
