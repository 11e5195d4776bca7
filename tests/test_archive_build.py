"""An archive firehose's spills and day build (firehosed/archive/): records land in the
day they were received on, a batch spilled twice is kept once, a build reads spills in
pieces, an interrupted build is rebuilt byte for byte, an empty day has no archive."""

from __future__ import annotations

import csv
import io
import zipfile
from datetime import date, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import pytest

from firehosed.archive import spill as spill_module
from firehosed.archive.build import Built, archive_name, build
from firehosed.archive.days import Days
from firehosed.archive.spill import Spill
from firehosed.fields import FieldsConfig
from firehosed.formats import zipcsv
from firehosed.record import Record

ZONE = "Asia/Kolkata"
DAY = date(2026, 12, 4)
DAYS = Days(ZONE)


def at(day: date, hour: int, minute: int = 0, second: float = 0) -> float:
    whole = int(second)
    local = datetime.combine(day, time(hour, minute, whole), ZoneInfo(ZONE))
    return local.timestamp() + (second - whole)


def record(kind: str, n: int, received: float, **body: object) -> Record:
    raw = msgspec.json.encode({"type": kind, "signal_id": {"$oid": f"id{n}"}, **body})
    return Record(kind, f"id{n}", None, None, received, received, raw)


COLUMNS = zipcsv.Columns(FieldsConfig(), None)


def rows_in(spill: Spill, day: date, kind: str) -> list[list[str]]:
    out = []
    for part in spill.parts(day, kind):
        with part.open() as data:
            text = data.read().decode()
        out.extend(csv.reader(io.StringIO(text, newline="")))
    return out


def ids_in(spill: Spill, day: date, kind: str) -> list[str]:
    return [row[1] for row in rows_in(spill, day, kind)]


def test_records_go_to_the_day_they_were_received_and_a_respill_keeps_them_once(
    tmp_path: Path,
) -> None:
    spill = Spill(tmp_path, DAYS)
    before = [record("c", n, at(DAY, 23, 59, 59.5)) for n in range(3)]
    after = [record("c", n, at(date(2026, 12, 5), 0, 0, 0.25)) for n in range(3, 5)]
    odd = record('a/b,"c"\n', 9, at(DAY, 12))
    assert spill.add(1, [*before, odd, *after], COLUMNS.part) == [DAY, date(2026, 12, 5)]
    # a crash before the queue heard: spilled again
    assert spill.add(1, [*before, odd, *after], COLUMNS.part) == [DAY, date(2026, 12, 5)]
    spill.add(2, [record("c", 5, at(DAY, 23, 59, 59.9))], COLUMNS.part)
    assert spill.spilled_days() == [DAY, date(2026, 12, 5)]
    assert spill.types(DAY) == ['a/b,"c"\n', "c"]
    assert ids_in(spill, DAY, "c") == ["id0", "id1", "id2", "id5"]
    assert ids_in(spill, date(2026, 12, 5), "c") == ["id3", "id4"]
    assert spill.count(DAY) == 5
    on_disk = sum(p.stat().st_size for p in (tmp_path / "spill").glob("*/*/*"))
    assert Spill(tmp_path, DAYS).bytes == on_disk  # what a restart counts for max_disk
    next_day = sum(p.stat().st_size for p in (tmp_path / "spill" / "2026-12-05").glob("*/*"))
    spill.drop(DAY)
    assert spill.spilled_days() == [date(2026, 12, 5)]
    assert Spill(tmp_path, DAYS).bytes == next_day


def test_spill_files_are_read_in_pieces_and_damage_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spill_module, "READ_CHUNK", 100)  # smaller than one row
    spill = Spill(tmp_path, DAYS)
    records = [record("c", n, at(DAY, 10), blob="x" * (n * 37 % 300)) for n in range(50)]
    spill.add(7, records, COLUMNS.part)
    assert rows_in(spill, DAY, "c") == list(csv.reader(io.StringIO(
        COLUMNS.part(records)[1].decode(), newline=""
    )))  # fmt: skip
    (path,) = (tmp_path / "spill" / DAY.isoformat() / b"c".hex()).iterdir()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged rows"):
        rows_in(spill, DAY, "c")


def build_day(spill: Spill, out: Path) -> Built | None:
    name = archive_name("{account}_%d%m%Y", "acme", DAY)
    return build(
        spill,
        DAY,
        out,
        name,
        event_names={"c": "add to cart"},
    )


def test_a_day_builds_one_zip_whose_cells_are_the_records(tmp_path: Path) -> None:
    spill = Spill(tmp_path, DAYS)
    spill.add(1, [record("c", n, at(DAY, 9, n), cart={"qty": n}) for n in range(10)], COLUMNS.part)
    spill.add(2, [record("t", 10, at(DAY, 18), total=9.5)], COLUMNS.part)
    built = build_day(spill, tmp_path / "out")
    assert built is not None
    assert built.name == "acme_04122026.zip"
    with zipfile.ZipFile(built.path) as archive:
        assert archive.namelist() == ["add to cart_04122026.csv", "t_04122026.csv"]
        text = archive.read("add to cart_04122026.csv").decode()
    header, *rows = csv.reader(io.StringIO(text, newline=""))
    assert header == ["type", "id", "session", "person", "time", "Payload.cart.qty"]
    assert [(row[1], row[5]) for row in rows] == [(f"id{n}", str(n)) for n in range(10)]


def test_an_interrupted_build_is_rebuilt_to_the_same_bytes(tmp_path: Path) -> None:
    spill = Spill(tmp_path, DAYS)
    spill.add(1, [record("c", n, at(DAY, 9), seq=n) for n in range(300)], COLUMNS.part)
    first = build_day(spill, tmp_path / "out")
    assert first is not None
    kept = first.path.read_bytes()
    # A crash mid-build: a partial file under the temporary name, no archive.
    first.path.unlink()
    (tmp_path / "out" / (first.name + ".building")).write_bytes(kept[: len(kept) // 3])
    again = build_day(spill, tmp_path / "out")
    assert again is not None
    assert again.path.read_bytes() == kept and again.sha256 == first.sha256
    assert not (tmp_path / "out" / (first.name + ".building")).exists()
    # Built already (a restart before delivery): the same file is offered again.
    assert build_day(spill, tmp_path / "out") == again


def test_a_day_without_records_has_no_archive(tmp_path: Path) -> None:
    spill = Spill(tmp_path, DAYS)
    spill.add(1, [record("c", 1, at(date(2026, 12, 5), 1))], COLUMNS.part)
    assert build_day(spill, tmp_path / "out") is None
    assert not any((tmp_path / "out").iterdir())


def test_archive_name_is_strftime_of_the_day_with_the_account() -> None:
    assert archive_name("{account}_%d%m%Y", "acme", DAY) == "acme_04122026.zip"
    assert archive_name("daily-%Y-%m-%d-{account}", "100%", DAY) == "daily-2026-12-04-100%.zip"


def test_batches_with_other_keys_merge_into_one_csv_per_type(tmp_path: Path) -> None:
    """Queue batches spill under their own columns; the day's CSV is every row under
    the union of them, in the order received."""
    records = [
        record("c", n, at(DAY, 9), **{f"k{n % 7}": n, "deep": {"a": [n]}}) for n in range(200)
    ]
    spill = Spill(tmp_path, DAYS)
    spill.add(1, records[:3], COLUMNS.part)  # k0..k2 only
    spill.add(2, records[3:], COLUMNS.part)
    built = build_day(spill, tmp_path / "out")
    assert built is not None and built.records == 200
    with zipfile.ZipFile(built.path) as archive:
        text = archive.read("add to cart_04122026.csv").decode()
    header, *rows = csv.reader(io.StringIO(text, newline=""))
    assert header[5:] == ["Payload.deep.a.0", *(f"Payload.k{n}" for n in range(7))]
    for n, row in enumerate(rows):
        cells = dict(zip(header, row, strict=True))
        assert cells["id"] == f"id{n}" and cells["Payload.deep.a.0"] == str(n)
        assert {k: v for k, v in cells.items() if k.startswith("Payload.k") and v} == {
            f"Payload.k{n % 7}": str(n)
        }
