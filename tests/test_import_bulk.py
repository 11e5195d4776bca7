"""CSV rows made into signals in bulk (`read_csv_blocks` and `RowMaker.block`) give what
the row-by-row reading gives (`read_rows` and `RowMaker.signal`): the same signals, byte
for byte, with the same envelopes and row numbers, and the same errors.

The files are written with every kind of row the bulk path hands back to `signal` (a
wrong number of cells, bytes that are not UTF-8, a row csv cannot parse, a bad type or
time, no identifier, values long enough to be measured) mixed with rows it makes itself
(empty ids and times among given ones, empty payload cells), in blocks small enough that
these fall at every place in a block.
"""

from __future__ import annotations

import csv
import io
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from firehosed.envelope import EnvelopeReader
from firehosed.fields import FieldsConfig
from firehosed.imports import child
from firehosed.imports.child import Job, open_rows, take
from firehosed.imports.rows import (
    CsvBlock,
    FileError,
    RowError,
    RowMaker,
    read_csv_blocks,
    read_rows,
)
from tests.test_import_rows import COLUMNS

NOW = 1_700_000_000.0
KINDS = ["view", "purchase", "add to cart", "", "a.b", "123", "k" * 65, "été"]
IDS = ["", "e-{n}", "i" * 70 + "{n}", "é" * 100 + "{n}", "x" * 300]
PEOPLE = ["", "c-{n}", "p" * 80, "ü" * 129, "z" * 257]
TIMES = [
    "",
    "2026-12-04T10:00:00Z",
    "2026-12-04T10:00:00.250+02:00",
    "2026-12-04T10:00:00",  # no offset: UTC
    "2026-12-04",
    "yesterday",
    "2026-12-04T10:00:00" + "0" * 60,
]
CELLS = ["", "plain", 'said "hi", twice', "two\nlines", "ünï", "back\\slash", "tab\there"]
BAD = "@@not-utf8@@"  # written as bytes that are not UTF-8


@pytest.fixture(autouse=True)
def _csv_limit() -> Iterator[None]:
    limit = csv.field_size_limit()
    yield
    csv.field_size_limit(limit)


@pytest.fixture(autouse=True)
def _local_time_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A time without an offset is UTC, not the machine's zone: make them differ."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def csv_file(path: Path, header: list[str], rows: int, seed: int) -> Path:
    """A CSV of `rows` random rows under `header` (values from the pools above for the
    envelope's columns), with blank lines, rows of the wrong width, cells that are not
    UTF-8 and rows csv cannot parse among them."""
    pick = random.Random(seed)
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(header)
    pools = {
        "event": KINDS,
        "type": KINDS,
        "event_id": IDS,
        "id": IDS,
        "customer_id": PEOPLE,
        "session_id": PEOPLE,
        "timestamp": TIMES,
    }
    for n in range(rows):
        chance = pick.random()
        if chance < 0.02:
            text.write("\r\n")  # a blank line: no row
            continue
        if chance < 0.04:
            text.write('"open"x,1\r\n')  # csv cannot read it
            continue
        cells = []
        for name in header:
            pool = pools.get(name)
            if pool is None:
                cells.append(pick.choice(CELLS) if pick.random() < 0.3 else f"{name}-{n}")
            elif pick.random() < 0.8:  # mostly the common value
                cells.append(pool[1].format(n=n))
            else:
                cells.append(pick.choice(pool).format(n=n))
        if chance < 0.06:
            cells.append("extra") if n % 2 else cells.pop()
        elif chance < 0.08:
            cells[pick.randrange(len(cells))] = BAD
        writer.writerow(cells)
    path.write_bytes(text.getvalue().encode().replace(BAD.encode(), b"a\xff\xfeb"))
    return path


Made = tuple[list[Any], list[RowError]]


def one_by_one(maker: RowMaker, path: Path, into: Made | None = None) -> Made:
    signals, errors = into or ([], [])
    for item in read_rows(path, "csv"):
        if isinstance(item, RowError):
            errors.append(item)
            continue
        made = maker.signal(item[1], item[0], "f@1", NOW)
        if isinstance(made, RowError):
            errors.append(made)
        else:
            signals.append((item[0], made[0], made[1]))
    return signals, errors


def in_bulk(maker: RowMaker, path: Path, size: int, into: Made | None = None) -> Made:
    signals, errors = into or ([], [])
    for item in read_csv_blocks(path, size):
        if isinstance(item, RowError):
            errors.append(item)
            continue
        assert isinstance(item, CsvBlock)
        made = maker.block(item, "f@1", NOW)
        assert made.numbers == sorted(made.numbers)
        errors.extend(made.errors)
        s = made.signals
        envelopes = zip(s.types, s.ids, s.sessions, s.persons, s.times, strict=True)
        for number, raw, (kind, id_, session, person, moment) in zip(
            made.numbers, s.raws, envelopes, strict=True
        ):
            signals.append((number, raw, (kind, id_, session, person, moment)))
    errors.sort(key=lambda error: error.row)
    return signals, errors


def envelope_tuple(envelope: Any) -> tuple[Any, ...]:
    return envelope.type, envelope.id, envelope.session, envelope.person, envelope.time


def assert_same(path: Path, columns: dict[str, str], fields: FieldsConfig, size: int) -> int:
    """The file read both ways gives the same; how many rows the bulk path made."""
    expected, expected_errors = one_by_one(RowMaker("task", columns, fields), path)
    maker = RowMaker("task", columns, fields)
    got, got_errors = in_bulk(maker, path, size)
    assert [(n, raw, envelope_tuple(e)) for n, raw, e in expected] == got
    assert expected_errors == got_errors
    reader = EnvelopeReader(fields)
    for _, raw, envelope in got:  # what the receiver would read from each
        read = reader.read(raw, NOW)
        assert envelope_tuple(read) == envelope and not read.id_assigned
    assert expected, "the file must hold valid rows"
    return len(got)


HEADER = ["event", "event_id", "customer_id", "session_id", "timestamp", "sku", "name"]


@pytest.mark.parametrize("size", [1, 7, 500])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bulk_rows_are_the_rows_one_by_one(tmp_path: Path, seed: int, size: int) -> None:
    path = csv_file(tmp_path / "a.csv", HEADER, 600, seed)
    assert_same(path, COLUMNS, FieldsConfig(), size)


@pytest.mark.parametrize(
    ("header", "fields"),
    [
        # no id and no time column: every id made and every time the import's
        (["type", "customer_id", "session_id", "sku"], FieldsConfig()),
        # columns in another order, envelope fields at other paths, one of them nested
        # in an object nothing else is in (an empty one cannot be left out)
        (
            ["sku", "timestamp", "event", "session_id", "customer_id", "event_id"],
            FieldsConfig(type="e.name", id="messageId", session="ctx.sid", person="uid"),
        ),
        # a payload column that nests: every row made one by one
        ([*HEADER, "cart.total"], FieldsConfig()),
        # a payload column on an envelope path: every row with it refused
        ([*HEADER, "did"], FieldsConfig()),
    ],
)
def test_bulk_rows_under_other_headers_and_paths(
    tmp_path: Path, header: list[str], fields: FieldsConfig
) -> None:
    columns = {name: column for name, column in COLUMNS.items() if column in header}
    path = csv_file(tmp_path / "b.csv", header, 400, 11)
    assert_same(path, columns, fields, 50)


def test_a_block_of_plain_rows_is_made_in_bulk_with_the_signals_json(tmp_path: Path) -> None:
    """A block the checks all pass: its signals are the rows' JSON, keys in the order
    `signal` places them (payload, then type, id, session, person, time), an empty cell
    left out; a made id after the time, the import's time last."""
    path = tmp_path / "c.csv"
    path.write_text(
        "event,event_id,customer_id,session_id,timestamp,sku\r\n"
        "view,e1,c1,s1,2026-12-04T10:00:00Z,k1\r\n"
        "buy,,c2,,2026-12-04T11:00:00Z,\r\n"
        "buy,e3,,s3,,k3\r\n"
    )
    (block,) = read_csv_blocks(path, 10)
    assert isinstance(block, CsvBlock)
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    made = maker.block(block, "c.csv@1", NOW)
    assert made.numbers == [1, 2, 3] and made.errors == []
    made_id = maker._made_id("c.csv@1", 2)
    assert made.signals.raws == [
        b'{"sku":"k1","type":"view","signal_id":{"$oid":"e1"},"did":"s1","pid":"c1",'
        b'"evdt":{"$date":"2026-12-04T10:00:00Z"}}',
        b'{"type":"buy","pid":"c2","evdt":{"$date":"2026-12-04T11:00:00Z"},'
        b'"signal_id":{"$oid":"' + made_id.encode() + b'"}}',
        b'{"sku":"k3","type":"buy","signal_id":{"$oid":"e3"},"did":"s3",'
        b'"evdt":{"$date":"2023-11-14T22:13:20.000Z"}}',
    ]
    assert made.signals.sessions == ["s1", None, "s3"]
    assert made.signals.persons == ["c1", "c2", None]
    assert made.signals.times == [1796378400.0, 1796382000.0, NOW]
    for raw in made.signals.raws:
        assert msgspec.json.decode(raw)


@pytest.mark.parametrize("done", [0, 1, 6, 7, 250])
def test_an_import_chunk_skips_the_rows_settled_before_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, done: int
) -> None:
    """`take` over blocks gives the chunks it gives over rows, from row `done` on."""
    monkeypatch.setattr(child, "now", lambda: NOW)  # the import's time, in both
    path = csv_file(tmp_path / "d.csv", HEADER, 300, 5)

    def chunks(rows: Iterator[Any]) -> list[tuple[Any, ...]]:
        maker, taken, settled = RowMaker("task", COLUMNS, FieldsConfig()), [], done
        while True:
            chunk = take(rows, maker, "d.csv@1", settled, 7)
            signals = chunk.signals
            taken.append(
                (
                    chunk.numbers,
                    signals.raws,
                    signals.ids,
                    sorted(chunk.errors, key=lambda e: e.row),
                    chunk.last,
                )
            )
            settled = max(settled, chunk.last)
            if chunk.ended:
                return taken

    by_rows = chunks(read_rows(path, "csv"))
    by_blocks = chunks(
        open_rows(Job(path, "csv", done, 7, "task", COLUMNS, FieldsConfig(), "d.csv@1"))[0]
    )
    flat = [n for numbers, *_ in by_blocks for n in numbers]
    assert flat and min(flat) > done
    assert [n for numbers, *_ in by_rows for n in numbers] == flat
    assert [e for *_, errors, _ in by_rows for e in errors] == [
        e for *_, errors, _ in by_blocks for e in errors
    ]
    assert b"".join(r for _, raws, *_ in by_rows for r in raws) == b"".join(
        r for _, raws, *_ in by_blocks for r in raws
    )
    assert by_rows[-1][-1] == by_blocks[-1][-1]  # the last row read


EDGES = {
    "bom and crlf": b"\xef\xbb\xbfevent,customer_id\r\nview,c1\r\nbuy,c2\r\n",
    "no newline at the end": b"event,customer_id\nview,c1\nbuy,c2",
    "blank lines": b"\n\nevent,customer_id\n\nview,c1\n\r\n\nbuy,c2\n\n",
    "quoted newlines": b'event,customer_id,note\nview,c1,"a\nb\r\nc"\nbuy,c2,"x"\n',
    "quote never closed": b'event,customer_id\nview,c1\nbuy,"c2\nview,c3\n',
    "bad row then quoted lines": b'event,customer_id,n\nview,c1,"x"y\nbuy,c2,"p\nq"\nview,c4,z\n',
    "bad row ends inside quotes": b'event,customer_id,n\nview,"c1"x,"p\nq,r"\nbuy,c2,z\n',
    "not utf-8 in a quoted cell": b'event,customer_id,n\nview,c1,"a\xff\nb"\nbuy,c2,ok\n',
    "not utf-8 header": b"event,\xffcustomer\nview,c1\n",
    "header alone": b"event,customer_id\r\n",
    "empty": b"",
    "a header twice named": b"event,event\nview,view\n",
    "a 3 MiB cell": b"event,customer_id,n\nview,c1," + b"y" * (3 << 20) + b"\nbuy,c2,z\n",
}


@pytest.mark.parametrize("size", [1, 2, 100])
@pytest.mark.parametrize("name", list(EDGES))
def test_odd_files_read_in_blocks_as_row_by_row(tmp_path: Path, name: str, size: int) -> None:
    """Each file ends in the same rows, errors and failure read either way."""
    path = tmp_path / "odd.csv"
    path.write_bytes(EDGES[name])

    def outcome(read: Any) -> tuple[Made, str | None]:
        """What `read` made of the file before it ended, and how it failed if it did."""
        made: Made = ([], [])
        try:
            read(made)
        except FileError as exc:
            return made, str(exc)
        return made, None

    fields = FieldsConfig(type="event", person="customer_id")
    (rows, row_errors), row_failure = outcome(
        lambda made: one_by_one(RowMaker("task", {}, fields), path, made)
    )
    (blocks, block_errors), block_failure = outcome(
        lambda made: in_bulk(RowMaker("task", {}, fields), path, size, made)
    )
    assert [(n, raw) for n, raw, _ in rows] == [(n, raw) for n, raw, _ in blocks]
    assert row_errors == sorted(block_errors, key=lambda error: error.row)
    assert row_failure == block_failure
