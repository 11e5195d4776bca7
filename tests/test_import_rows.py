"""Import files read into rows, and rows made into signals (firehosed/imports/rows.py).

Every file is a real one written to tmp_path; every signal is read back by the
account's EnvelopeReader, the way the pipeline reads an HTTP POST.
"""

from __future__ import annotations

import csv
import gc
import gzip
import json
import re
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from firehosed.envelope import EnvelopeReader
from firehosed.fields import FieldsConfig
from firehosed.imports.rows import (
    REMEMBERED_CHARS,
    FileError,
    RowError,
    RowMaker,
    columns_problem,
    read_rows,
)

MiB = 1 << 20
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
COLUMNS = {
    "type": "event",
    "id": "event_id",
    "person": "customer_id",
    "time": "timestamp",
    "session": "session_id",
}


@pytest.fixture(autouse=True)
def _csv_limit() -> Iterator[None]:
    """read_rows may raise csv's process-wide cell limit; each test starts from one."""
    limit = csv.field_size_limit()
    yield
    csv.field_size_limit(limit)


def write(path: Path, data: bytes) -> Path:
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def read(path: Path, fmt: str, **limits: int) -> list[Any]:
    return list(read_rows(path, fmt, **limits))


def good(items: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    return [item for item in items if not isinstance(item, RowError)]


def errors(items: list[Any]) -> list[RowError]:
    return [item for item in items if isinstance(item, RowError)]


def signal(maker: RowMaker, row: dict[str, Any], number: int = 1, key: str = "f@1") -> Any:
    made = maker.record(row, number, key, NOW)
    assert isinstance(made, bytes), made
    return msgspec.json.decode(made)


def refused(maker: RowMaker, row: dict[str, Any], number: int = 1) -> RowError:
    made = maker.record(row, number, "f@1", NOW)
    assert isinstance(made, RowError), made
    return made


# CSV


CSV = b"event,customer_id,name\nview,c1,Ann\nbuy,c2,Bob\n"


def test_csv_rows_are_dicts_numbered_from_1_under_the_header(tmp_path: Path) -> None:
    items = read(write(tmp_path / "a.csv", CSV), "csv")
    assert items == [
        (1, {"event": "view", "customer_id": "c1", "name": "Ann"}),
        (2, {"event": "buy", "customer_id": "c2", "name": "Bob"}),
    ]


def test_csv_crlf_reads_as_lf_and_a_bom_is_dropped(tmp_path: Path) -> None:
    lf = read(write(tmp_path / "lf.csv", CSV), "csv")
    crlf = read(write(tmp_path / "crlf.csv", CSV.replace(b"\n", b"\r\n")), "csv")
    bom = read(write(tmp_path / "bom.csv", b"\xef\xbb\xbf" + CSV), "csv")
    assert crlf == lf
    assert bom == lf
    assert "event" in bom[0][1]


def test_csv_quoted_cells_may_hold_commas_quotes_and_newlines(tmp_path: Path) -> None:
    data = b'event,note\r\nview,"a, ""b""\r\nc"\r\nbuy,x\r\n'
    items = read(write(tmp_path / "q.csv", data), "csv")
    assert items == [
        (1, {"event": "view", "note": 'a, "b"\r\nc'}),
        (2, {"event": "buy", "note": "x"}),
    ]


def test_csv_blank_lines_are_skipped_and_not_counted(tmp_path: Path) -> None:
    items = read(write(tmp_path / "b.csv", b"\nevent,n\n\nview,1\n\n\nbuy,2\n\n"), "csv")
    assert items == [(1, {"event": "view", "n": "1"}), (2, {"event": "buy", "n": "2"})]


def test_csv_an_empty_cell_is_left_out_of_its_row(tmp_path: Path) -> None:
    items = read(write(tmp_path / "e.csv", b"event,a,b\nview,,2\n"), "csv")
    assert items == [(1, {"event": "view", "b": "2"})]


def test_csv_invalid_utf8_is_an_error_of_its_row_naming_the_column(tmp_path: Path) -> None:
    data = "event,name,city\nview,Zoë,Paris\nview,B\xffb,Lyon\nbuy,Ann,Köln\n".encode("latin-1")
    data = data.replace("Zoë".encode("latin-1"), "Zoë".encode()).replace(
        "Köln".encode("latin-1"), "Köln".encode()
    )
    items = read(write(tmp_path / "u.csv", data), "csv")
    assert items == [
        (1, {"event": "view", "name": "Zoë", "city": "Paris"}),
        RowError(2, "name", "not valid UTF-8"),
        (3, {"event": "buy", "name": "Ann", "city": "Köln"}),
    ]


def test_csv_too_few_or_too_many_cells_are_row_errors(tmp_path: Path) -> None:
    data = b"a,b,c\n1,2,3\n1,2\n1,2,3,4,5\n7,8,9\n"
    items = read(write(tmp_path / "w.csv", data), "csv")
    assert items == [
        (1, {"a": "1", "b": "2", "c": "3"}),
        RowError(2, "", "2 cells, the header has 3"),
        RowError(3, "", "5 cells, the header has 3"),
        (4, {"a": "7", "b": "8", "c": "9"}),
    ]


def test_csv_a_malformed_row_is_an_error_and_reading_goes_on(tmp_path: Path) -> None:
    # The quote after "a" closes the cell, then "b" is not a delimiter; the row's last
    # cell opens a quote that goes on to the next line, which is part of the same row.
    data = b'x,y,z\n1,"a"b,"c\nd"\n2,3,4\n'
    items = read(write(tmp_path / "m.csv", data), "csv")
    assert [type(item) for item in items] == [RowError, tuple]
    assert items[0].row == 1 and items[0].reason.startswith("bad CSV: ")
    assert items[1] == (2, {"x": "2", "y": "3", "z": "4"})


def test_csv_a_quote_never_closed_fails_the_file_after_the_rows_before_it(
    tmp_path: Path,
) -> None:
    data = b'a,b\n1,2\n3,"never closed\n4,5\n6,7\n'
    rows = read_rows(write(tmp_path / "q.csv", data), "csv")
    assert next(rows) == (1, {"a": "1", "b": "2"})
    with pytest.raises(FileError, match="a quote opened in row 2 is never closed"):
        next(rows)


@pytest.mark.parametrize("data", [b"", b"\n\n\r\n", b"\xef\xbb\xbf"])
def test_csv_an_empty_file_fails(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(FileError, match=re.escape("empty file: no header row")):
        read(write(tmp_path / "e.csv", data), "csv")


def test_csv_a_header_alone_gives_no_rows_and_no_error(tmp_path: Path) -> None:
    assert read(write(tmp_path / "h.csv", b"event,person\r\n"), "csv") == []
    assert read(write(tmp_path / "h2.csv", b"event,person"), "csv") == []


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"a,b,a\n", "column 'a' appears twice in the header row"),
        (b"a,,c\n", "column 2 of the header row has no name"),
        (b"a,\xff\n", "the header row is not valid UTF-8"),
    ],
)
def test_csv_a_bad_header_fails_the_file(tmp_path: Path, header: bytes, reason: str) -> None:
    with pytest.raises(FileError, match=re.escape(reason)):
        read(write(tmp_path / "h.csv", header + b"1,2,3\n"), "csv")


def test_csv_a_cell_over_max_cell_is_a_row_error(tmp_path: Path) -> None:
    data = b"a,b\n1,2\n3," + b"x" * 101 + b"\n5,6\n"
    items = read(write(tmp_path / "c.csv", data), "csv", max_cell=100)
    assert items == [
        (1, {"a": "1", "b": "2"}),
        RowError(2, "b", "cell over 100 characters"),
        (3, {"a": "5", "b": "6"}),
    ]


def traced_peak(run: Any) -> int:
    """Peak bytes traced by tracemalloc while `run()` goes."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("quoted", [False, True])
def test_csv_a_10_mib_cell_costs_about_its_size_and_reading_goes_on(
    tmp_path: Path, quoted: bool
) -> None:
    # Quoted, the cell spans lines: the row must end where its quote closes, not at the
    # line where csv gave up.
    cell = b"y" * (10 * MiB) if not quoted else b'"' + b"yyyy\n" * (2 * MiB) + b'"'
    path = write(tmp_path / "big.csv", b"a,b\n1,2\n3," + cell + b"\n5,6\n")
    items: list[Any] = []
    peak = traced_peak(lambda: items.extend(read_rows(path, "csv")))
    assert items[0] == (1, {"a": "1", "b": "2"})
    assert isinstance(items[1], RowError) and items[1].row == 2
    assert items[2:] == [(3, {"a": "5", "b": "6"})]
    assert peak < 25 * MiB


def test_csv_a_10_mib_cell_is_read_when_max_cell_allows(tmp_path: Path) -> None:
    path = write(tmp_path / "big.csv", b"a,b\n1," + b"z" * (10 * MiB) + b"\n")
    [(number, row)] = read(path, "csv", max_cell=11 * MiB)
    assert number == 1 and len(row["b"]) == 10 * MiB


def test_csv_is_streamed_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "many.csv"
    line = "view,{i},c{i},s{i},2024-03-01T10:00:00Z,9.5,Product,{pad}\n"
    with path.open("w") as f:
        f.write("event,event_id,customer_id,session_id,timestamp,cart.total,name,note\n")
        for start in range(0, 64_000, 1_000):
            f.write("".join(line.format(i=i, pad="p" * 250) for i in range(start, start + 1_000)))
    assert path.stat().st_size > 18 * MiB
    maker = RowMaker("t", COLUMNS, FieldsConfig())
    counted = [0]

    def run() -> None:
        for item in read_rows(path, "csv"):
            assert not isinstance(item, RowError)
            made = maker.record(item[1], item[0], "f@1", NOW)
            assert isinstance(made, bytes)
            counted[0] += 1

    assert traced_peak(run) < 2 * MiB
    assert counted[0] == 64_000


# NDJSON


def test_ndjson_a_bad_line_in_the_middle_is_a_row_error(tmp_path: Path) -> None:
    data = b'{"event":"view","n":1}\n\n{not json}\n[1,2]\r\n"text"\n{"event":"buy","n":2.5}\n'
    items = read(write(tmp_path / "a.ndjson", data), "ndjson")
    assert items[0] == (1, {"event": "view", "n": 1})
    assert items[1].row == 2 and items[1].reason.startswith("not JSON")
    assert items[2:4] == [
        RowError(3, "", "a JSON array, not an object"),
        RowError(4, "", "a JSON string, not an object"),
    ]
    assert items[4] == (5, {"event": "buy", "n": 2.5})


def test_ndjson_a_bom_a_last_line_without_newline_and_bad_utf8(tmp_path: Path) -> None:
    data = b'\xef\xbb\xbf{"a":"\xff"}\n{"a":"b"}'
    items = read(write(tmp_path / "a.ndjson", data), "ndjson")
    assert isinstance(items[0], RowError) and items[0].row == 1
    assert items[1] == (2, {"a": "b"})


def test_ndjson_a_line_over_max_row_is_a_row_error(tmp_path: Path) -> None:
    data = b'{"a":1}\n{"b":"' + b"x" * 5000 + b'"}\n{"c":3}\n'
    items = read(write(tmp_path / "a.ndjson", data), "ndjson", max_row=1000)
    assert items == [(1, {"a": 1}), RowError(2, "", "line over 1000 bytes"), (3, {"c": 3})]


# JSON


def test_json_array_elements_keep_their_types(tmp_path: Path) -> None:
    rows = [
        {"event": "view", "n": 1, "f": 2.5, "ok": True, "none": None, "cart": {"p": [1, "x"]}},
        {"event": "buy", "big": 12345678901234567890},
    ]
    items = read(write(tmp_path / "a.json", json.dumps(rows).encode()), "json")
    assert items == [(1, rows[0]), (2, rows[1])]


@pytest.mark.parametrize("fmt", ["ndjson", "json"])
def test_json_numbers_are_kept_exactly_as_written(tmp_path: Path, fmt: str) -> None:
    text = b'{"event":"v","customer_id":"c","x":0.1,"y":1e400,"z":-2,"big":123456789012345678901}'
    data = text + b"\n" if fmt == "ndjson" else b"[" + text + b"]"
    [(number, row)] = read(write(tmp_path / f"n.{fmt}", data), fmt)
    made = RowMaker("task", COLUMNS, FieldsConfig()).record(row, number, "f", NOW)
    assert isinstance(made, bytes)
    for number_text in (b'"x":0.1', b'"y":1E+400', b'"z":-2', b'"big":123456789012345678901'):
        assert number_text in made


def test_json_an_element_not_an_object_is_a_row_error(tmp_path: Path) -> None:
    data = b' \n[{"a":1}, 5, null, "s", [1], {"b":2}]'
    items = read(write(tmp_path / "a.json", data), "json")
    assert items == [
        (1, {"a": 1}),
        RowError(2, "", "a JSON number, not an object"),
        RowError(3, "", "a JSON null, not an object"),
        RowError(4, "", "a JSON string, not an object"),
        RowError(5, "", "a JSON array, not an object"),
        (6, {"b": 2}),
    ]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"a": [1, 2]}', "not a JSON array: it starts with an object"),
        (b"  42", "not a JSON array: it starts with '4'"),
        (b"  \n ", "not a JSON array: the file is empty"),
        (b"", "not a JSON array: the file is empty"),
    ],
)
def test_json_a_file_that_is_not_an_array_fails(tmp_path: Path, data: bytes, reason: str) -> None:
    with pytest.raises(FileError, match=re.escape(reason)):
        read(write(tmp_path / "a.json", data), "json")


def test_json_malformed_part_way_fails_the_file_saying_where(tmp_path: Path) -> None:
    data = b'[{"a":1},{"a":2},{"a":3 "b":4},{"a":5}]'
    rows = read_rows(write(tmp_path / "a.json", data), "json")
    assert [next(rows), next(rows)] == [(1, {"a": 1}), (2, {"a": 2})]
    with pytest.raises(FileError, match=r"malformed JSON after row 2, in the first \d+ bytes"):
        next(rows)


def test_json_an_empty_array_and_a_truncated_one(tmp_path: Path) -> None:
    assert read(write(tmp_path / "e.json", b"[ ]"), "json") == []
    with pytest.raises(FileError, match="malformed JSON after row 1"):
        read(write(tmp_path / "t.json", b'[{"a":1}, {"a":'), "json")


def test_json_an_element_over_max_row_fails_the_file(tmp_path: Path) -> None:
    data = b'[{"a":1}, {"b":"' + b"x" * 400_000 + b'"}]'
    with pytest.raises(FileError, match="row 2 is over 100000 bytes"):
        read(write(tmp_path / "a.json", data), "json", max_row=100_000)


def test_json_is_streamed_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "many.json.gz"
    element = b'{"event":"view","customer_id":"c%d","note":"' + b"n" * 300 + b'"}'
    with gzip.open(path, "wb") as f:
        f.write(b"[")
        for start in range(0, 40_000, 1_000):
            f.write(b",".join(element % i for i in range(start, start + 1_000)))
            f.write(b"," if start < 39_000 else b"]")
    counted = [0]

    def run() -> None:
        for item in read_rows(path, "json"):
            assert not isinstance(item, RowError)
            counted[0] += 1

    assert traced_peak(run) < 2 * MiB
    assert counted[0] == 40_000


# gzip


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        ("csv", CSV),
        ("ndjson", b'{"a":1}\n{"a":2}\n'),
        ("json", b'[{"a":1},{"a":2}]'),
    ],
)
def test_gzip_reads_as_the_plain_file(tmp_path: Path, fmt: str, data: bytes) -> None:
    plain = read(write(tmp_path / f"a.{fmt}", data), fmt)
    gzipped = read(write(tmp_path / f"a.{fmt}.gz", data), fmt)
    assert gzipped == plain and len(plain) == 2


@pytest.mark.parametrize("fmt", ["csv", "ndjson", "json"])
def test_a_truncated_gzip_fails_the_file(tmp_path: Path, fmt: str) -> None:
    rows = [{"event": "view", "n": str(i), "pad": "p" * 50} for i in range(20_000)]
    if fmt == "csv":
        data = b"event,n,pad\n" + b"".join(f"view,{i},{'p' * 50}\n".encode() for i in range(20_000))
    elif fmt == "ndjson":
        data = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    else:
        data = json.dumps(rows).encode()
    whole = gzip.compress(data)
    path = tmp_path / f"a.{fmt}.gz"
    path.write_bytes(whole[: len(whole) // 2])
    got: list[Any] = []
    with pytest.raises(FileError, match="truncated gzip: "):
        got.extend(read_rows(path, fmt))
    assert got, "the rows before the cut are read"


def test_a_file_named_gz_that_is_not_gzip_fails(tmp_path: Path) -> None:
    path = tmp_path / "a.csv.gz"
    path.write_bytes(CSV)
    with pytest.raises(FileError, match="not a valid gzip file"):
        read(path, "csv")


def test_a_damaged_gzip_fails_the_file(tmp_path: Path) -> None:
    data = bytearray(gzip.compress(CSV * 200))
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "a.csv.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(FileError, match="gzip"):
        read(path, "csv")


def test_a_missing_file_fails_and_an_unknown_format_is_a_caller_bug(tmp_path: Path) -> None:
    with pytest.raises(FileError, match="cannot read the file"):
        read(tmp_path / "none.csv", "csv")
    with pytest.raises(ValueError, match="unknown import format"):
        read(write(tmp_path / "a.csv", CSV), "xml")


# Signals


def test_a_row_becomes_a_signal_at_the_accounts_field_paths() -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    row = {
        "event": "add_to_cart",
        "event_id": "e1",
        "customer_id": "c1",
        "session_id": "s1",
        "timestamp": "2024-03-01T10:00:00.5Z",
        "cart.total": "9.5",
        "cart.items.0": "x",
        "name": "Ann",
    }
    assert signal(maker, row) == {
        "type": "add_to_cart",
        "signal_id": {"$oid": "e1"},
        "did": "s1",
        "pid": "c1",
        "evdt": {"$date": "2024-03-01T10:00:00.5Z"},
        "cart": {"total": "9.5", "items": {"0": "x"}},
        "name": "Ann",
    }


def test_what_a_maker_remembers_of_long_column_names_is_bounded_in_bytes() -> None:
    """Column names are remembered as checked, and a cell (a CSV header's, a JSON key)
    may be a MiB long: 40 rows each with a 1 MiB column name of its own keep at most
    REMEMBERED_CHARS of them (they kept 40 MiB twice over: as plain columns and as row
    shapes), and each row is still made."""
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    base = {"event": "view", "event_id": "e1", "customer_id": "c1", "session_id": "s1"}
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for n in range(40):
            made = signal(maker, {**base, f"{n:04d}".ljust(1 << 20, "x"): "v"})
            assert made[f"{n:04d}".ljust(1 << 20, "x")] == "v"
        gc.collect()
        kept = tracemalloc.take_snapshot().compare_to(before, "filename")
    finally:
        tracemalloc.stop()
    assert sum(stat.size_diff for stat in kept) < 3 * REMEMBERED_CHARS


def test_unmapped_fields_are_read_from_columns_of_their_own_name() -> None:
    maker = RowMaker("task", {}, FieldsConfig())
    made = signal(maker, {"type": "view", "id": "i1", "person": "p1", "session": "s1"})
    assert made["type"] == "view" and made["signal_id"] == {"$oid": "i1"}
    assert (made["pid"], made["did"]) == ("p1", "s1")


def test_other_field_paths_are_followed() -> None:
    fields = FieldsConfig(
        type="event.name", id="messageId", session="ctx.session", person="ctx.user", time="ts"
    )
    maker = RowMaker("task", COLUMNS, fields)
    row = {"event": "view", "event_id": "m1", "customer_id": "u1", "timestamp": "2024-01-02"}
    made = maker.record(row, 1, "f@1", NOW)
    assert isinstance(made, bytes)
    assert msgspec.json.decode(made) == {
        "event": {"name": "view"},
        "messageId": "m1",
        "ctx": {"user": "u1"},
        "ts": "2024-01-02",
    }
    envelope = EnvelopeReader(fields).read(made, NOW)
    assert (envelope.type, envelope.id, envelope.person, envelope.session) == (
        "view",
        "m1",
        "u1",
        None,
    )
    assert envelope.time == datetime(2024, 1, 2, tzinfo=UTC).timestamp()


def test_a_row_needs_a_person_or_a_session() -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    assert refused(maker, {"event": "view", "name": "x"}, 7) == RowError(
        7, "customer_id", "no person or session identifier"
    )
    plain = RowMaker("task", {}, FieldsConfig())
    assert refused(plain, {"type": "view", "person": ""}) == RowError(
        1, "person", "no person or session identifier"
    )
    assert "did" in signal(maker, {"event": "view", "session_id": "s"})
    assert "pid" in signal(maker, {"event": "view", "customer_id": "p"})


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        (None, "no type"),
        ("", "no type"),
        ("page.view", "type 'page.view' must not contain '.'"),
        ("1234", "type '1234' must not be all digits"),
        ("x" * 65, "type must be 1 to 64 characters"),
    ],
)
def test_a_bad_type_is_a_row_error_naming_its_column(kind: str | None, reason: str) -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    row = {"customer_id": "c"} if kind is None else {"event": kind, "customer_id": "c"}
    assert refused(maker, row) == RowError(1, "event", reason)


def test_a_type_of_64_characters_is_fine() -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    assert signal(maker, {"event": "x" * 64, "customer_id": "c"})["type"] == "x" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-01T10:00:00Z", datetime(2024, 3, 1, 10, tzinfo=UTC)),
        ("2024-03-01T10:00:00.250+02:00", datetime(2024, 3, 1, 8, 0, 0, 250_000, tzinfo=UTC)),
        ("2024-03-01 10:00:00", datetime(2024, 3, 1, 10, tzinfo=UTC)),
        ("2024-03-01", datetime(2024, 3, 1, tzinfo=UTC)),
        ("20240301T100000Z", datetime(2024, 3, 1, 10, tzinfo=UTC)),
    ],
)
def test_iso_8601_times_are_accepted_as_written(text: str, expected: datetime) -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    made = maker.record({"event": "v", "customer_id": "c", "timestamp": text}, 1, "f", NOW)
    assert isinstance(made, bytes)
    assert msgspec.json.decode(made)["evdt"] == {"$date": text}
    assert EnvelopeReader(FieldsConfig()).read(made, NOW).time == expected.timestamp()


@pytest.mark.parametrize("text", ["yesterday", "1709287200000", "2024-13-01", "2024-03-01T25:00"])
def test_a_bad_time_is_a_row_error_naming_its_column(text: str) -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    error = refused(maker, {"event": "v", "customer_id": "c", "timestamp": text})
    assert (error.column, error.reason) == ("timestamp", f"unparseable time {text!r}")


def test_a_row_without_time_gets_the_import_time() -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    made = maker.record({"event": "v", "customer_id": "c"}, 1, "f", NOW)
    assert isinstance(made, bytes)
    assert msgspec.json.decode(made)["evdt"] == {"$date": "2023-11-14T22:13:20.000Z"}
    assert EnvelopeReader(FieldsConfig()).read(made, 0.0).time == NOW
    later = signal(maker, {"event": "v", "customer_id": "c"} | {}, 2)
    assert later["evdt"] == {"$date": "2023-11-14T22:13:20.000Z"}
    other = maker.record({"event": "v", "customer_id": "c"}, 3, "f", NOW + 0.0125)
    assert isinstance(other, bytes)
    assert msgspec.json.decode(other)["evdt"] == {"$date": "2023-11-14T22:13:20.012Z"}


def test_made_ids_are_stable_across_reads_and_differ_across_rows_files_and_tasks(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "a.csv", b"event,customer_id\nview,c1\nview,c1\n")

    def ids(task: str, key: str) -> list[str]:
        maker = RowMaker(task, COLUMNS, FieldsConfig())
        made = []
        for item in read_rows(path, "csv"):
            assert not isinstance(item, RowError)
            made.append(signal(maker, item[1], item[0], key)["signal_id"]["$oid"])
        return made

    first = ids("task", "a.csv@1")
    assert first == ids("task", "a.csv@1")
    assert first[0] != first[1]
    assert all(re.fullmatch(r"[0-9a-f]{24}", ident) for ident in first)
    assert set(first).isdisjoint(ids("task", "a.csv@2"))
    assert set(first).isdisjoint(ids("other", "a.csv@1"))


def test_a_given_id_is_kept_and_an_empty_one_is_made() -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    given = signal(maker, {"event": "v", "customer_id": "c", "event_id": "E-1"})
    made = signal(maker, {"event": "v", "customer_id": "c", "event_id": ""})
    assert given["signal_id"] == {"$oid": "E-1"}
    assert re.fullmatch(r"[0-9a-f]{24}", made["signal_id"]["$oid"])


@pytest.mark.parametrize("column", ["event_id", "customer_id", "session_id"])
def test_an_identifier_over_256_bytes_is_a_row_error(column: str) -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    row = {"event": "v", "customer_id": "c", column: "é" * 129}
    error = refused(maker, row)
    assert error.column == column and "258 bytes, at most 256" in error.reason
    assert isinstance(maker.record(row | {column: "é" * 128}, 1, "f", NOW), bytes)


def test_a_dotted_column_inside_another_columns_value_is_a_row_error() -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    base = {"event": "v", "customer_id": "c"}
    assert refused(maker, base | {"cart": "full", "cart.total": "9"}) == RowError(
        1, "cart.total", "would be inside column 'cart'"
    )
    assert refused(maker, base | {"a.b.c": "1", "a.b": "2"}) == RowError(
        1, "a.b.c", "would be inside column 'a.b'"
    )
    # the same columns without the clash are fine, and siblings share their parent
    assert signal(maker, base | {"cart": "full"})["cart"] == "full"
    made = signal(maker, base | {"a.b.c": "1", "a.b.d": "2", "a.e": "3"})
    assert made["a"] == {"b": {"c": "1", "d": "2"}, "e": "3"}


def test_a_payload_column_on_an_envelope_path_is_a_row_error() -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    base = {"event": "v", "customer_id": "c"}
    error = refused(maker, base | {"did": "d"})
    assert error.column == "did" and error.reason.startswith("lands on the session field (did)")
    assert refused(maker, base | {"signal_id": "1"}).column == "signal_id"
    assert refused(maker, base | {"evdt.$date.x": "1"}).column == "evdt.$date.x"
    # beside an envelope value, not on it: a sibling in the same object
    made = maker.record(base | {"signal_id.x": "1"}, 1, "f", NOW)
    assert isinstance(made, bytes) and msgspec.json.decode(made)["signal_id"]["x"] == "1"
    assert EnvelopeReader(FieldsConfig()).read(made, NOW).id_assigned is False


def test_a_column_name_with_an_empty_part_is_kept_whole() -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    made = signal(maker, {"event": "v", "customer_id": "c", "a..b": "1", ".x": "2", "y.": "3"})
    assert (made["a..b"], made[".x"], made["y."]) == ("1", "2", "3")


def test_json_rows_keep_their_types_and_integer_identifiers_become_text() -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    row = {"event": "v", "customer_id": 42, "event_id": 7, "cart": {"total": 9.5}, "n": None}
    made = signal(maker, row)
    assert (made["pid"], made["signal_id"]) == ("42", {"$oid": "7"})
    assert made["cart"] == {"total": 9.5} and made["n"] is None
    assert row["cart"] == {"total": 9.5} and "event" in row, "the row is left as it was"


@pytest.mark.parametrize(
    ("row", "column", "reason"),
    [
        ({"event": True}, "event", "type must be a string, not a boolean"),
        ({"event": ["v"]}, "event", "type must be a string, not a array"),
        ({"timestamp": 1709287200000}, "timestamp", "must be an ISO 8601 string, not a number"),
        ({"customer_id": {"id": 1}}, "customer_id", "person must be a string, not a object"),
    ],
)
def test_json_envelope_values_of_the_wrong_kind_are_row_errors(
    row: dict[str, Any], column: str, reason: str
) -> None:
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    error = refused(maker, {"event": "v", "customer_id": "c"} | row)
    assert error.column == column and reason in error.reason


def test_columns_must_name_envelope_fields_each_its_own_column() -> None:
    assert columns_problem(COLUMNS) is None
    assert columns_problem({"person": "session", "session": "sid"}) is None
    assert columns_problem({"person": "session"}) == (
        "columns ['session'] would each hold more than one envelope field"
    )
    with pytest.raises(ValueError, match="unknown envelope fields"):
        RowMaker("task", {"email": "e"}, FieldsConfig())
    with pytest.raises(ValueError, match="more than one envelope field"):
        RowMaker("task", {"person": "who", "session": "who"}, FieldsConfig())
    with pytest.raises(ValueError, match="more than one envelope field"):
        RowMaker("task", {"person": "session"}, FieldsConfig())


def test_every_valid_row_of_a_mixed_file_is_accepted_by_the_envelope_reader(
    tmp_path: Path,
) -> None:
    data = (
        b"event,event_id,customer_id,session_id,timestamp,cart.total,note\r\n"
        b"view,e1,c1,s1,2024-03-01T10:00:00Z,1.5,plain\r\n"
        b'add_to_cart,,c2,,2024-03-01T10:00:01.123+01:00,,"a, b"\r\n'
        b"view,e3,,s3,,2,\r\n"
        b"view,e4,,,2024-03-01T10:00:00Z,3,no person\r\n"
        b"page.view,e5,c5,s5,2024-03-01T10:00:00Z,4,bad type\r\n"
        b"view,e6,c6,s6,soon,5,bad time\r\n"
        b"view,e7,c7\r\n"
        b'purchase,e8,c8,s8,2024-03-02,6,"multi\r\nline"\r\n'
    )
    path = write(tmp_path / "mixed.csv.gz", data)
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    reader = EnvelopeReader(FieldsConfig())
    accepted, refusals = {}, []
    for item in read_rows(path, "csv"):
        made = item if isinstance(item, RowError) else maker.record(item[1], item[0], "k", NOW)
        if isinstance(made, RowError):
            refusals.append((made.row, made.column))
        else:
            envelope = reader.read(made, NOW)
            accepted[item[0]] = (envelope.type, envelope.id, envelope.session, envelope.person)
    assert refusals == [(4, "customer_id"), (5, "event"), (6, "timestamp"), (7, "")]
    assert accepted[1] == ("view", "e1", "s1", "c1")
    assert accepted[2][0::2] == ("add_to_cart", None) and accepted[2][3] == "c2"
    assert re.fullmatch(r"[0-9a-f]{24}", accepted[2][1])
    assert accepted[3] == ("view", "e3", "s3", None)
    assert accepted[8] == ("purchase", "e8", "s8", "c8")
    assert sorted(accepted) == [1, 2, 3, 8]


@pytest.mark.parametrize(
    "fields",
    [
        FieldsConfig(),
        FieldsConfig(
            type="event.name", id="messageId", session="ctx.session", person="ctx.user", time="ts"
        ),
    ],
)
def test_the_envelope_given_with_a_signal_is_what_the_reader_reads_from_it(
    fields: FieldsConfig,
) -> None:
    """The receiver takes an import's envelopes as given: each must be exactly what the
    account's EnvelopeReader reads from the signal's bytes, record by record and as a
    whole request."""
    rows = [
        {"event": "view", "event_id": "e1", "customer_id": "c1", "session_id": "s1"},
        {"event": "buy", "customer_id": 42, "timestamp": "2024-03-01T10:00:01.123+01:00"},
        {"event": "view", "event_id": 7, "session_id": "s3", "timestamp": "2024-03-02"},
        {"event": "add", "session_id": "s4", "note": "two\nlines\r\n", "cart.total": 2},
        {"event": "view", "customer_id": "é" * 60, "timestamp": "2024-03-01 10:00:00.5"},
    ]
    maker = RowMaker("task", COLUMNS, fields)
    reader = EnvelopeReader(fields)
    now = NOW + 0.0123456  # the import's time, which a signal holds to the millisecond
    made = [maker.signal(row, number, "f@1", now) for number, row in enumerate(rows, 1)]
    assert not [m for m in made if isinstance(m, RowError)]
    signals = [m for m in made if not isinstance(m, RowError)]
    for raw, given in signals:
        assert given == reader.read(raw, NOW + 5)
        assert b"\n" not in raw and b"\r" not in raw
    # All of them (read record by record: a time msgspec does not parse), and those
    # whose times it does (read as one batch, which also finds them plain).
    for request, plain in ((signals, False), (signals[:2] + signals[3:4], True)):
        read, rejected = reader.read_all([raw for raw, _ in request], NOW + 5)
        assert rejected == []
        assert read.types == [given.type for _, given in request]
        assert read.ids == [given.id for _, given in request]
        assert read.sessions == [given.session for _, given in request]
        assert read.persons == [given.person for _, given in request]
        assert read.times == [given.time for _, given in request]
        assert read.plain is plain
