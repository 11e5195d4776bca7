"""The daily archive's zip (firehosed/formats/zipcsv.py) and calendar (archive/days.py):
every cell checked against the records, hostile keys and types, DST days, ZIP64.

The daemon-level tests (a day cut at a controlled midnight, delivered over SFTP and S3)
come with the archive firehose; these pin the file format and the day arithmetic.
"""

from __future__ import annotations

import csv
import io
import struct
import subprocess
import zipfile
from datetime import date, time
from pathlib import Path
from shutil import which

import msgspec
import pytest

from firehosed.archive.days import Days
from firehosed.fields import FieldsConfig
from firehosed.formats import zipcsv
from firehosed.mapping import Mapping
from firehosed.record import Record

FIELDS = FieldsConfig()


def record(kind: str, n: int, body: dict[str, object], *, at: float = 1_700_000_000.0) -> Record:
    raw = {"type": kind, "signal_id": {"$oid": f"id{n}"}, "did": f"s{n}", **body}
    return Record(kind, f"id{n}", f"s{n}", None, at + n, at + n, msgspec.json.encode(raw))


def part(records: list[Record], mapping: Mapping | None = None) -> zipcsv.Part:
    header, data = zipcsv.Columns(FIELDS, mapping).part(records)
    return zipcsv.Part(header, len(records), len(data), lambda: io.BytesIO(data))


def build(path: Path, by_type: dict[str, list[Record]], mapping: Mapping | None = None) -> None:
    entries = [
        zipcsv.Entry(name, [part(by_type[kind], mapping)])
        for kind, name in zipcsv.entry_names(by_type, "04122026", {"c": "add to cart"})
    ]
    with path.open("wb") as out:
        zipcsv.write(out, entries)


def rows(path: Path, name: str) -> list[list[str]]:
    with zipfile.ZipFile(path) as archive:
        data = archive.read(name)
    assert data.endswith(b"\r\n"), "every row ends in CRLF"
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


def test_one_csv_per_type_named_by_event_names_with_every_key(tmp_path: Path) -> None:
    path = tmp_path / "acme_04122026.zip"
    by_type = {
        "c": [
            record("c", 1, {"cart": {"p": [{"prid": "cam", "qty": 1}], "curr": "GBP"}}),
            record("c", 2, {"cart": {"p": [{"prid": "bag"}, {"prid": "pen", "qty": 2}]}}),
        ],
        "t": [record("t", 3, {"total": 12.5, "paid": True, "note": None})],
    }
    build(path, by_type)
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["add to cart_04122026.csv", "t_04122026.csv"]
        assert archive.testzip() is None
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    with zipfile.ZipFile(path) as archive:
        data = archive.read("add to cart_04122026.csv")
    assert b"\n" not in data.replace(b"\r\n", b""), "rows end in CRLF, never a bare LF"
    header, *cart = rows(path, "add to cart_04122026.csv")
    assert header == [
        "type", "id", "session", "person", "time",
        "Payload.cart.curr", "Payload.cart.p.0.prid", "Payload.cart.p.0.qty",
        "Payload.cart.p.1.prid", "Payload.cart.p.1.qty",
    ]  # fmt: skip
    assert cart == [
        ["c", "id1", "s1", "", "2023-11-14T22:13:21Z", "GBP", "cam", "1", "", ""],
        ["c", "id2", "s2", "", "2023-11-14T22:13:22Z", "", "bag", "", "pen", "2"],
    ]
    header, purchase = rows(path, "t_04122026.csv")
    assert header[5:] == ["Payload.note", "Payload.paid", "Payload.total"]
    assert purchase[5:] == ["", "true", "12.5"]


def test_hostile_keys_and_values_stay_correct_csv_and_never_share_a_column(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.zip"
    body = {
        "a.b": "dotted key",
        "a": {"b": "nested"},
        'q"uote,comma\nline': 'val "x", y\r\nz',
        "ünï": "çødé ✓",
        "back\\slash": 1,
        "empty": {},
        "none": [],
    }
    build(path, {"weird,type": [record("weird,type", 1, body)]})
    with zipfile.ZipFile(path) as archive:
        (name,) = archive.namelist()
    assert name == "weird,type_04122026.csv"
    header, row = rows(path, name)
    cells = dict(zip(header, row, strict=True))
    assert cells["Payload.a\\.b"] == "dotted key"
    assert cells["Payload.a.b"] == "nested"
    assert cells['Payload.q"uote,comma\nline'] == 'val "x", y\r\nz'
    assert cells["Payload.ünï"] == "çødé ✓"
    assert cells["Payload.back\\\\slash"] == "1"
    assert cells["Payload.empty"] == "{}" and cells["Payload.none"] == "[]"
    assert cells["type"] == "weird,type"


def test_a_mapping_gives_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "m.zip"
    mapping = Mapping({"kind": "type", "product": "cart.p.0.prid", "absent": "x.y"})
    build(path, {"c": [record("c", 1, {"cart": {"p": [{"prid": "cam"}]}})]}, mapping)
    assert rows(path, "add to cart_04122026.csv") == [
        ["kind", "product", "absent"],
        ["c", "cam", ""],
    ]


def test_parts_under_other_columns_are_laid_out_under_the_days(tmp_path: Path) -> None:
    """Each queue batch spills its rows under its own columns; the day's CSV has the
    union, and every cell lands under its own column whichever part it came from."""
    first = [record("c", 1, {"a": "1", "m": {"x": 'q,"uote\r\n'}})]
    second = [record("c", 2, {"b": 2}), record("c", 3, {"a": "3", "b": 3})]
    path = tmp_path / "p.zip"
    with path.open("wb") as out:
        zipcsv.write(out, [zipcsv.Entry("c.csv", [part(first), part(second), part(first)])])
    header, *cells = rows(path, "c.csv")
    assert header[5:] == ["Payload.a", "Payload.b", "Payload.m.x"]
    assert [row[1:2] + row[5:] for row in cells] == [
        ["id1", "1", "", 'q,"uote\r\n'],
        ["id2", "", "2", ""],
        ["id3", "3", "3", ""],
        ["id1", "1", "", 'q,"uote\r\n'],
    ]


def test_a_mapping_changed_during_the_day_drops_no_cell(tmp_path: Path) -> None:
    old, new = Mapping({"kind": "type", "x": "x"}), Mapping({"kind": "type", "y": "y"})
    path = tmp_path / "m.zip"
    parts = [part([record("c", 1, {"x": 1, "y": 2})], old)]
    parts.append(part([record("c", 2, {"x": 3, "y": 4})], new))
    with path.open("wb") as out:
        zipcsv.write(out, [zipcsv.Entry("c.csv", parts)])
    assert rows(path, "c.csv") == [["kind", "y", "x"], ["c", "", "1"], ["c", "4", ""]]


def test_a_damaged_part_fails_the_build(tmp_path: Path) -> None:
    def damaged() -> io.BytesIO:
        raise ValueError("damaged rows")

    header, data = zipcsv.Columns(FIELDS, None).part([record("c", 1, {})])
    entry = zipcsv.Entry("c.csv", [zipcsv.Part(header, 1, len(data), damaged)])
    with (tmp_path / "d.zip").open("wb") as out, pytest.raises(ValueError, match="damaged"):
        zipcsv.write(out, [entry])


def test_a_rebuild_is_byte_identical(tmp_path: Path) -> None:
    by_type = {"c": [record("c", n, {"n": n}) for n in range(500)]}
    build(tmp_path / "1.zip", by_type)
    build(tmp_path / "2.zip", by_type)
    assert (tmp_path / "1.zip").read_bytes() == (tmp_path / "2.zip").read_bytes()


@pytest.mark.skipif(which("unzip") is None, reason="unzip is not installed")
def test_unzip_accepts_it(tmp_path: Path) -> None:
    path = tmp_path / "u.zip"
    build(path, {"c": [record("c", n, {"n": n}) for n in range(100)]})
    done = subprocess.run(["unzip", "-t", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_entry_that_may_pass_4_gib_gets_zip64_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound decides ZIP64 before streaming; a lowered limit shows the switch (a
    real 4 GiB entry is the benchmark's business, not a unit test's)."""
    monkeypatch.setattr(zipcsv, "ZIP64_LIMIT", 5_000)
    path = tmp_path / "z.zip"
    build(path, {"c": [record("c", n, {"n": n}) for n in range(200)], "t": [record("t", 1, {})]})
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        local = {i.filename: i.header_offset for i in archive.infolist()}
    data = path.read_bytes()

    def local_extra(name: str) -> bytes:
        at = local[name]
        assert data[at : at + 4] == b"PK\x03\x04"
        name_len, extra_len = struct.unpack("<HH", data[at + 26 : at + 30])
        return data[at + 30 + name_len : at + 30 + name_len + extra_len]

    assert local_extra("add to cart_04122026.csv")[:2] == b"\x01\x00"  # the ZIP64 field
    assert local_extra("t_04122026.csv") == b""


@pytest.mark.parametrize(
    ("zone", "day", "hours"),
    [
        ("Europe/London", date(2026, 3, 29), 23),  # clocks go forward
        ("Europe/London", date(2026, 10, 25), 25),  # and back
        ("America/New_York", date(2026, 11, 1), 25),
        ("Asia/Kolkata", date(2026, 12, 4), 24),
    ],
)
def test_days_are_whole_local_days_dst_included(zone: str, day: date, hours: int) -> None:
    days = Days(zone)
    start, end = days.start(day), days.end(day)
    assert end - start == hours * 3600
    assert days.of(start) == day and days.of(end - 0.001) == day and days.of(end) != day


def test_a_missed_midnight_gives_every_ended_day_oldest_first() -> None:
    days = Days("Asia/Kolkata")
    now = days.at(date(2026, 12, 5), time(0, 30))
    assert days.ended(date(2026, 12, 2), now) == [
        date(2026, 12, 2),
        date(2026, 12, 3),
        date(2026, 12, 4),
    ]
    assert days.ended(date(2026, 12, 5), now) == []
