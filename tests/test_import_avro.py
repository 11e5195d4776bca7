"""Avro import files read into rows (firehosed/imports/avro.py), and those rows made
into signals by the same RowMaker as CSV rows.

Every file is written by fastavro into tmp_path, in several schemas and codecs; corrupt
files are made by changing bytes of a sound one at offsets fastavro's block reader
reports.
"""

from __future__ import annotations

import base64
import gzip
import importlib.util
import io
import tracemalloc
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import msgspec
import pytest

from firehosed.envelope import EnvelopeReader
from firehosed.fields import FieldsConfig
from firehosed.imports.rows import FileError, RowError, RowMaker, read_rows

MiB = 1 << 20
NOW = 1_700_000_000.0
COLUMNS = {"type": "event", "id": "event_id", "person": "customer_id", "time": "at"}


def record(name: str, **fields: Any) -> dict[str, Any]:
    """An Avro record schema of `fields` (name: type), in order."""
    return {
        "type": "record",
        "name": name,
        "fields": [{"name": k, "type": v} for k, v in fields.items()],
    }


def logical(kind: str, logical_type: str, **more: Any) -> dict[str, Any]:
    return {"type": kind, "logicalType": logical_type, **more}


FLAT = record(
    "Event",
    event="string",
    event_id="long",
    customer_id=["null", "string"],
    at="string",
    price=["null", "double"],
    paid="boolean",
    channel={"type": "enum", "name": "Channel", "symbols": ["WEB", "APP"]},
)


def flat_record(n: int) -> dict[str, Any]:
    return {
        "event": "purchase" if n % 2 else "view",
        "event_id": n,
        "customer_id": None if n % 10 == 0 else f"c{n}",
        "at": f"2026-12-04T10:{n % 60:02d}:00Z",
        "price": n / 4 if n % 3 else None,
        "paid": n % 2 == 1,
        "channel": "APP" if n % 5 else "WEB",
    }


ADDRESS = record("Address", city="string", geo=["null", {"type": "map", "values": "double"}])
ITEM = record(
    "Item", sku="string", digest="bytes", price=logical("bytes", "decimal", precision=9, scale=2)
)
NESTED = record(
    "Order",
    event="string",
    customer_id="string",
    at=logical("long", "timestamp-millis"),
    address=ADDRESS,
    labels={"type": "map", "values": "string"},
    items={"type": "array", "items": ITEM},
    tags={"type": "array", "items": "string"},
    ship_to=["null", "string", "Address"],
    token={"type": "fixed", "name": "Token", "size": 4},
    raw=["null", "bytes"],
    day=logical("int", "date"),
    opens=logical("int", "time-millis"),
    seen=logical("long", "timestamp-micros"),
    local=logical("long", "local-timestamp-millis"),
    ref=logical("string", "uuid"),
)
START = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)


def nested_record(n: int) -> dict[str, Any]:
    return {
        "event": "purchase",
        "customer_id": f"c{n}",
        "at": START + timedelta(milliseconds=1500 * n),
        "address": {"city": "Lyon", "geo": {"lat": 45.75, "lon": 4.85} if n % 2 else None},
        "labels": {"source": "mail", "campaign": f"c-{n % 3}"},
        "items": [{"sku": f"sku-{n}", "digest": bytes([n % 256, 255]), "price": Decimal("9.90")}],
        "tags": ["a", "b"],
        "ship_to": {"city": "Paris", "geo": None} if n % 2 else f"store-{n}",
        "token": b"\x00\x01\x02\x03",
        "raw": b"hi" if n % 2 else None,
        "day": date(2026, 12, 4),
        "opens": time(9, 30),
        "seen": START + timedelta(microseconds=n),
        "local": datetime(2026, 12, 4, 11, 0),
        "ref": uuid.UUID(int=n),
    }


def write_avro(
    path: Path,
    schema: dict[str, Any] | str,
    records: Iterable[Any],
    codec: str = "deflate",
    sync_interval: int = 4000,
) -> Path:
    out = io.BytesIO()
    fastavro.writer(out, schema, records, codec=codec, sync_interval=sync_interval)
    data = out.getvalue()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def read(path: Path, after: int = 0) -> list[Any]:
    return list(read_rows(path, "avro", after=after))


def good(items: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    return [item for item in items if not isinstance(item, RowError)]


def errors(items: list[Any]) -> list[RowError]:
    return [item for item in items if isinstance(item, RowError)]


def signal_of(maker: RowMaker, item: Any) -> dict[str, Any]:
    made = maker.record(item[1], item[0], "f@1", NOW)
    assert isinstance(made, bytes), made
    decoded: dict[str, Any] = msgspec.json.decode(made)
    return decoded


def blocks_of(path: Path) -> list[tuple[int, int, int]]:
    """(offset, size, records) of each block, as fastavro reports them."""
    with path.open("rb") as f:
        return [(b.offset, b.size, b.num_records) for b in fastavro.block_reader(f)]


def data_start(data: bytes | bytearray, offset: int) -> int:
    """Where the (compressed) data of the block at `offset` starts: after its two longs."""
    for _ in range(2):
        while data[offset] & 0x80:
            offset += 1
        offset += 1
    return offset


def changed(path: Path, edit: Callable[[bytearray], None]) -> Path:
    data = bytearray(path.read_bytes())
    edit(data)
    out = path.with_name("changed-" + path.name)
    out.write_bytes(bytes(data))
    return out


# Sound files


@pytest.mark.parametrize("codec", ["null", "deflate", "snappy"])
def test_flat_records_are_rows_as_they_are_with_nulls_left_out(tmp_path: Path, codec: str) -> None:
    records = [flat_record(n) for n in range(1, 501)]
    path = write_avro(tmp_path / "events.avro", FLAT, records, codec=codec)
    assert len(blocks_of(path)) > 3  # several blocks, read one after another
    items = read(path)
    assert not errors(items)
    expected = [
        (n, {k: v for k, v in r.items() if v is not None}) for n, r in enumerate(records, 1)
    ]
    assert items == expected


def test_nested_records_and_maps_flatten_and_other_types_become_json(tmp_path: Path) -> None:
    path = write_avro(tmp_path / "orders.avro", NESTED, [nested_record(n) for n in (1, 2)])
    (first, second) = read(path)
    assert first == (
        1,
        {
            "event": "purchase",
            "customer_id": "c1",
            "at": "2026-12-04T10:00:01.500000Z",
            "address.city": "Lyon",
            "address.geo.lat": 45.75,
            "address.geo.lon": 4.85,
            "labels.source": "mail",
            "labels.campaign": "c-1",
            "items": [{"sku": "sku-1", "digest": "Af8=", "price": Decimal("9.90")}],
            "tags": ["a", "b"],
            "ship_to.city": "Paris",
            "token": "AAECAw==",
            "raw": "aGk=",
            "day": "2026-12-04",
            "opens": "09:30:00",
            "seen": "2026-12-04T10:00:00.000001Z",
            "local": "2026-12-04T11:00:00",
            "ref": "00000000-0000-0000-0000-000000000001",
        },
    )
    assert base64.b64decode(first[1]["items"][0]["digest"]) == b"\x01\xff"
    # The other branch of each union; nulls (geo, raw) absent, as an empty CSV cell.
    assert second[1]["ship_to"] == "store-2"
    assert "address.geo.lat" not in second[1] and "raw" not in second[1]


def test_an_avro_row_becomes_the_signal_a_csv_row_would(tmp_path: Path) -> None:
    path = write_avro(tmp_path / "orders.avro", NESTED, [nested_record(1)])
    maker = RowMaker(
        "task", {"type": "event", "person": "customer_id", "time": "at"}, FieldsConfig()
    )
    made = signal_of(maker, read(path)[0])
    assert made["evdt"] == {"$date": "2026-12-04T10:00:01.500000Z"}
    assert made["pid"] == "c1" and made["type"] == "purchase"
    assert made["address"] == {"city": "Lyon", "geo": {"lat": 45.75, "lon": 4.85}}
    assert made["labels"] == {"source": "mail", "campaign": "c-1"}
    assert made["items"] == [{"sku": "sku-1", "digest": "Af8=", "price": 9.90}]
    # An exact decimal is written as the JSON number it is.
    raw = maker.record(read(path)[0][1], 1, "f@1", NOW)
    assert isinstance(raw, bytes) and b'"price":9.90' in raw
    assert made["ship_to"] == {"city": "Paris"}
    assert EnvelopeReader(FieldsConfig()).read(msgspec.json.encode(made), NOW).person == "c1"


def test_a_long_identifier_becomes_text_and_a_time_must_be_iso_text(tmp_path: Path) -> None:
    schema = record(
        "R", event="string", event_id="long", customer_id="string", at=["string", "long"]
    )
    rows = [
        {"event": "view", "event_id": 7, "customer_id": "c", "at": "2026-12-04T10:00:00Z"},
        {"event": "view", "event_id": 8, "customer_id": "c", "at": 1764842400000},
    ]
    items = read(write_avro(tmp_path / "r.avro", schema, rows))
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    assert signal_of(maker, items[0])["signal_id"] == {"$oid": "7"}
    refused = maker.record(items[1][1], 2, "f@1", NOW)
    assert isinstance(refused, RowError)
    assert (refused.row, refused.column) == (2, "at")
    assert "ISO 8601" in refused.reason


def test_records_of_a_non_record_schema_are_row_errors(tmp_path: Path) -> None:
    path = write_avro(tmp_path / "strings.avro", "string", ["a", "b"])
    assert read(path) == [
        RowError(1, "", "an Avro str value, not a record"),
        RowError(2, "", "an Avro str value, not a record"),
    ]


def test_two_values_flattening_to_one_column_are_a_row_error(tmp_path: Path) -> None:
    # A map whose values are strings or maps: {"b": {"c": ...}} and {"b.c": ...} both
    # flatten to "a.b.c".
    inner = {"type": "map", "values": "string"}
    schema = record("R", a={"type": "map", "values": ["string", inner]})
    rows = [{"a": {"b": {"c": "1"}, "x": "2"}}, {"a": {"b": {"c": "1"}, "b.c": "2"}}]
    items = read(write_avro(tmp_path / "r.avro", schema, rows))
    assert items == [
        (1, {"a.b.c": "1", "a.x": "2"}),
        RowError(2, "a.b.c", "two values for this column (a map key with a '.')"),
    ]


def test_a_dotted_map_key_inside_another_columns_value_is_refused_by_the_row_maker(
    tmp_path: Path,
) -> None:
    schema = record(
        "R", customer_id="string", event="string", a={"type": "map", "values": "string"}
    )
    rows = [{"customer_id": "c", "event": "view", "a": {"x": "1", "x.y": "2"}}]
    (item,) = read(write_avro(tmp_path / "r.avro", schema, rows))
    assert item == (1, {"customer_id": "c", "event": "view", "a.x": "1", "a.x.y": "2"})
    refused = RowMaker("t", COLUMNS, FieldsConfig()).record(item[1], 1, "f@1", NOW)
    assert refused == RowError(1, "a.x.y", "would be inside column 'a.x'")


def test_a_gzipped_file_reads_as_the_plain_one(tmp_path: Path) -> None:
    records = [flat_record(n) for n in range(1, 301)]
    plain = read(write_avro(tmp_path / "e.avro", FLAT, records))
    assert read(write_avro(tmp_path / "e.avro.gz", FLAT, records)) == plain


def test_rows_after_a_resumed_point_are_the_same_as_a_full_read(tmp_path: Path) -> None:
    path = write_avro(tmp_path / "e.avro", FLAT, [flat_record(n) for n in range(1, 1001)])
    full = read(path)
    for after in (0, 1, 140, 500, 999, 1000):
        resumed = read(path, after=after)
        assert [item for item in resumed if item[0] > after] == full[after:]
        assert all(item[0] > after - 200 for item in resumed)  # whole blocks passed over


def test_an_empty_container_has_no_rows(tmp_path: Path) -> None:
    assert read(write_avro(tmp_path / "e.avro", FLAT, [])) == []


def test_is_streamed_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "many.avro"
    pad = "p" * 250
    records = ({**flat_record(n), "note": pad} for n in range(80_000))
    schema = {**FLAT, "fields": [*FLAT["fields"], {"name": "note", "type": "string"}]}
    write_avro(path, schema, records, codec="null", sync_interval=64_000)
    assert path.stat().st_size > 20 * MiB
    maker = RowMaker("t", COLUMNS, FieldsConfig())
    counted = [0]

    def run() -> None:
        for item in read_rows(path, "avro"):
            assert not isinstance(item, RowError)
            if item[1].get("customer_id"):
                assert isinstance(maker.record(item[1], item[0], "f@1", NOW), bytes)
            counted[0] += 1

    tracemalloc.start()
    try:
        run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert counted[0] == 80_000
    assert peak < 4 * MiB


# Files that cannot be read at all


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not an Avro object container file: empty"),
        (b"event,customer_id\nview,c1\n", "not an Avro object container file: starts with"),
        (b"Obj\x01", "unreadable Avro header"),
        (b"Obj\x01\x02\x00garbage", "unreadable Avro header"),
    ],
)
def test_a_file_without_an_avro_header_fails(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "x.avro"
    path.write_bytes(data)
    with pytest.raises(FileError, match=reason):
        read(path)


def with_codec(sound: Path, codec: str) -> Path:
    """`sound` (codec null) with a header that names `codec` instead."""
    data = sound.read_bytes()
    first_block = blocks_of(sound)[0][0]
    with sound.open("rb") as f:
        schema = fastavro.block_reader(f).metadata["avro.schema"].encode()
    meta = {b"avro.schema": schema, b"avro.codec": codec.encode()}
    entries = b"".join(_varint(len(k)) + k + _varint(len(v)) + v for k, v in meta.items())
    sync = data[first_block - 16 : first_block]
    header = b"Obj\x01" + _varint(len(meta)) + entries + b"\x00" + sync
    out = sound.with_name(f"{codec}-{sound.name}")
    out.write_bytes(header + data[first_block:])
    return out


def test_an_unknown_codec_fails_the_file_naming_it(tmp_path: Path) -> None:
    sound = write_avro(tmp_path / "e.avro", FLAT, [flat_record(1)], codec="null")
    assert read(with_codec(sound, "null")) == read(sound)  # the header is made right
    with pytest.raises(FileError, match="unknown Avro codec 'brotli'"):
        read(with_codec(sound, "brotli"))


def test_a_codec_whose_library_is_missing_fails_the_file_saying_so(tmp_path: Path) -> None:
    if importlib.util.find_spec("lz4") is not None:
        pytest.skip("lz4 is installed here: the codec reads")
    sound = write_avro(tmp_path / "e.avro", FLAT, [flat_record(1)], codec="null")
    with pytest.raises(FileError, match="the Avro codec 'lz4' needs a library not installed"):
        read(with_codec(sound, "lz4"))


# Corrupt blocks: their rows fail, with the offset; the rest of the file is read


def test_a_block_that_does_not_inflate_fails_its_rows_and_reading_goes_on(tmp_path: Path) -> None:
    records = [flat_record(n) for n in range(1, 1001)]
    sound = write_avro(tmp_path / "e.avro", FLAT, records)
    blocks = blocks_of(sound)
    offset, _, count = blocks[2]
    first = sum(b[2] for b in blocks[:2]) + 1
    # 0xFF opens a deflate block of the reserved type 3: inflating it fails.
    corrupt = changed(sound, lambda d: d.__setitem__(data_start(d, offset), 0xFF))
    items = read(corrupt)
    assert len(items) == 1000
    failed = errors(items)
    assert [e.row for e in failed] == list(range(first, first + count))
    assert {e.column for e in failed} == {""}
    assert failed[0].reason.startswith(
        f"corrupt Avro block at byte {offset} (rows {first} to {first + count - 1}): "
    )
    assert "invalid block type" in failed[0].reason
    sound_rows = read(sound)
    assert good(items) == [item for item in sound_rows if not first <= item[0] < first + count]


def test_records_that_do_not_decode_fail_their_whole_block(tmp_path: Path) -> None:
    records = [flat_record(n) for n in range(1, 401)]
    sound = write_avro(tmp_path / "e.avro", FLAT, records, codec="null")
    offset, size, count = blocks_of(sound)[1]
    # Bytes that are not UTF-8 in the middle of the block's strings: its early records
    # decode, the block fails as a whole all the same.
    middle = offset + size // 2
    corrupt = changed(sound, lambda d: d.__setitem__(slice(middle, middle + 4), b"\xff" * 4))
    failed = errors(read(corrupt))
    first = blocks_of(sound)[0][2] + 1
    assert [e.row for e in failed] == list(range(first, first + count))
    assert f"at byte {offset}" in failed[0].reason
    assert len(good(read(corrupt))) == 400 - count


def test_a_corrupt_sync_marker_fails_its_block_only(tmp_path: Path) -> None:
    sound = write_avro(tmp_path / "e.avro", FLAT, [flat_record(n) for n in range(1, 1001)])
    blocks = blocks_of(sound)
    offset, size, count = blocks[1]
    corrupt = changed(
        sound, lambda d: d.__setitem__(offset + size - 3, d[offset + size - 3] ^ 0xFF)
    )
    items = read(corrupt)
    failed = errors(items)
    assert [e.row for e in failed] == list(range(blocks[0][2] + 1, blocks[0][2] + count + 1))
    assert "sync marker" in failed[0].reason
    assert len(good(items)) == 1000 - count


@pytest.mark.parametrize("size", [8191, -8192, 1 << 40])
def test_a_corrupt_block_size_is_skipped_to_the_next_sync_marker(tmp_path: Path, size: int) -> None:
    sound = write_avro(tmp_path / "e.avro", FLAT, [flat_record(n) for n in range(1, 1001)])
    blocks = blocks_of(sound)
    offset, _, count = blocks[3]
    # The block's byte size, the varint after its row count: too large (into the blocks
    # after it), negative, or past any file.
    size_at = offset + len(_varint(count))
    old = len(_varint(data_start(sound.read_bytes(), offset) - size_at))
    corrupt = changed(sound, lambda d: d.__setitem__(slice(size_at, size_at + old), _varint(size)))
    items = read(corrupt)
    failed = errors(items)
    before = sum(b[2] for b in blocks[:3])
    assert [e.row for e in failed] == list(range(before + 1, before + count + 1))
    assert failed[0].reason.startswith(f"corrupt Avro block at byte {offset} ")
    ids = [item[1]["event_id"] for item in good(items)]
    assert ids == [n for n in range(1, 1001) if not before < n <= before + count]


def _varint(n: int) -> bytes:
    """An Avro long: zigzag, then 7 bits a byte."""
    value = (n << 1) ^ (n >> 63)
    out = b""
    while value > 0x7F:
        out += bytes([value & 0x7F | 0x80])
        value >>= 7
    return out + bytes([value])


def test_a_file_cut_short_fails_the_rows_of_its_last_block(tmp_path: Path) -> None:
    sound = write_avro(tmp_path / "e.avro", FLAT, [flat_record(n) for n in range(1, 1001)])
    blocks = blocks_of(sound)
    offset, size, count = blocks[4]
    cut = tmp_path / "cut.avro"
    cut.write_bytes(sound.read_bytes()[: offset + size // 2])
    items = read(cut)
    before = sum(b[2] for b in blocks[:4])
    assert len(good(items)) == before
    assert [e.row for e in errors(items)] == list(range(before + 1, before + count + 1))
    assert f"at byte {offset}" in errors(items)[0].reason


def test_every_valid_row_of_a_damaged_file_is_accepted_by_the_envelope_reader(
    tmp_path: Path,
) -> None:
    records = [flat_record(n) for n in range(1, 2001)]
    sound = write_avro(tmp_path / "e.avro", FLAT, records)
    offset = blocks_of(sound)[5][0]
    corrupt = changed(sound, lambda d: d.__setitem__(data_start(d, offset), 0xFF))
    maker = RowMaker("task", COLUMNS, FieldsConfig())
    reader = EnvelopeReader(FieldsConfig())
    accepted, refused = set(), {}
    for item in read_rows(corrupt, "avro"):
        made = item if isinstance(item, RowError) else maker.record(item[1], item[0], "k", NOW)
        if isinstance(made, RowError):
            refused[made.row] = made.column
        else:
            accepted.add(reader.read(made, NOW).id)
    no_person = {n for n in range(1, 2001) if n % 10 == 0}
    broken = {row for row, column in refused.items() if column == ""}
    assert {row for row, column in refused.items() if column} == no_person - broken
    assert {column for column in refused.values() if column} == {"customer_id"}
    assert accepted == {str(n) for n in set(range(1, 2001)) - no_person - broken}
    assert len(broken) == blocks_of(sound)[5][2]
