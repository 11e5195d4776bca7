"""Avro and Parquet batch files (formats/avro.py, formats/parquet.py): read back with
fastavro, pyarrow and DuckDB and compared cell by cell with the signals posted; the
same batch always encodes to the same bytes; and through a real daemon, the files a
firehose delivers, also after a crash with a batch cut and not yet delivered.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import fastavro
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from firehosed import formats
from firehosed.formats import avro, parquet
from firehosed.mapping import Mapping
from firehosed.record import Block, Joined, Record, Rows, encoded_block
from tests.daemon import signal_record, wait_until
from tests.test_semantics import MAPPING, blocked_channel, files_of, firehose, post_ok

COLUMNS = {
    "type": "type",
    "person": "pid",
    "email": "person.email",
    "product": "cart.p.0.prid",
    "note": "note",
    "cart": "cart",
    "total": "cart.cv",
    "flag": "flag",
    "missing": "no.such.path",
}
ENVELOPE = ["type", "id", "session", "person", "time", "signal"]
START = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def signals(count: int = 6) -> list[dict[str, Any]]:
    """Signals with every kind of value a cell can hold: text, numbers, booleans, an
    object, an array, null, absent, non-ASCII."""
    made = []
    for n in range(count):
        signal = signal_record(
            n + 1,
            kind=("pd", "c", "t")[n % 3],
            session=f"s{n}" if n % 4 else None,  # one each: no session identified later
            person=f"p{n}" if n % 3 else None,
            cart={"p": [{"prid": f"cam-{n}"}], "cv": n + 0.25} if n % 2 else {"p": []},
            note=["café ☕", 'a, "quoted"\nline', None][n % 3],
            flag=[True, False, None, 7][n % 4],
        )
        at = START + timedelta(seconds=n, milliseconds=n % 1000)
        signal["evdt"] = {"$date": at.isoformat(timespec="milliseconds").replace("+00:00", "Z")}
        if n % 2:
            signal["person"] = {"email": f"p{n}@example.com"}
        made.append(signal)
    return made


def records(posted: list[dict[str, Any]]) -> Rows:
    """The queued records of `posted` signals, as a cut reads them."""
    rows = Rows()
    for signal in posted:
        rows.append(
            Record(
                type=signal["type"],
                id=signal["signal_id"]["$oid"],
                session=signal.get("did"),
                person=signal.get("pid"),
                time=moment(signal).timestamp(),
                received=1_790_000_000.0,
                raw=msgspec.json.encode(signal),
            )
        )
    return rows


def moment(signal: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(signal["evdt"]["$date"].replace("Z", "+00:00"))


def expected_envelope(signal: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": signal["type"],
        "id": signal["signal_id"]["$oid"],
        "session": signal.get("did"),
        "person": signal.get("pid"),
        "time": moment(signal),
    }


def expected_cells(signal: dict[str, Any]) -> dict[str, str | None]:
    """The mapped cells of `signal`: what its CSV cells are, null where a CSV's is empty
    because the value is missing or null."""
    cart = signal.get("cart", {})
    products = cart.get("p", [])
    flag = signal.get("flag")
    return {
        "type": signal["type"],
        "person": signal.get("pid"),
        "email": signal.get("person", {}).get("email"),
        "product": products[0]["prid"] if products else None,
        "note": signal.get("note"),
        "cart": json.dumps(cart, separators=(",", ":"), ensure_ascii=False),
        "total": json.dumps(cart["cv"]) if "cv" in cart else None,
        "flag": None if flag is None else json.dumps(flag),
        "missing": None,
    }


def avro_rows(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The writer's schema and the records of an Avro container file."""
    reader = fastavro.reader(io.BytesIO(data))
    return reader.writer_schema, list(reader)


# -- Avro -------------------------------------------------------------------------------


def test_avro_without_a_mapping_holds_the_envelope_and_the_signal() -> None:
    posted = signals()
    data = formats.encode("avro", records(posted), None, "deflate")
    schema, rows = avro_rows(data)
    assert schema["name"] == "firehosed.Signal"
    assert [field["name"] for field in schema["fields"]] == ENVELOPE
    assert [field["type"] for field in schema["fields"]] == [
        "string",
        "string",
        ["null", "string"],
        ["null", "string"],
        {"type": "long", "logicalType": "timestamp-micros"},
        "string",
    ]
    assert len(rows) == len(posted)
    for row, signal in zip(rows, posted, strict=True):
        assert {k: v for k, v in row.items() if k != "signal"} == expected_envelope(signal)
        assert json.loads(row["signal"]) == signal
    assert fastavro.reader(io.BytesIO(data)).codec == "deflate"


def test_avro_with_a_mapping_holds_its_columns_as_nullable_strings() -> None:
    posted = signals()
    data = formats.encode("avro", records(posted), Mapping(COLUMNS), "none")
    schema, rows = avro_rows(data)
    assert schema["name"] == "firehosed.MappedSignal"
    assert [field["name"] for field in schema["fields"]] == list(COLUMNS)
    assert {json.dumps(field["type"]) for field in schema["fields"]} == {'["null", "string"]'}
    assert rows == [expected_cells(signal) for signal in posted]
    assert fastavro.reader(io.BytesIO(data)).codec == "null"


def test_avro_of_the_same_batch_is_the_same_bytes_and_its_sync_marker_is_the_batchs() -> None:
    batch = records(signals(50))
    first = formats.encode("avro", batch, None, "deflate")
    assert formats.encode("avro", records(signals(50)), None, "deflate") == first
    marker = avro.sync_marker(batch)
    with io.BytesIO(first) as f:
        reader = fastavro.block_reader(f)
        assert reader._header["sync"] == marker
    other = records(signals(51))
    assert avro.sync_marker(other) != marker
    assert formats.encode("avro", other, None, "deflate") != first
    # fastavro's own writer picks a random marker: the same records, other bytes.
    out = io.BytesIO()
    fastavro.writer(out, avro.ENVELOPE_SCHEMA, [])
    again = io.BytesIO()
    fastavro.writer(again, avro.ENVELOPE_SCHEMA, [])
    assert out.getvalue() != again.getvalue()


def test_avro_many_records_span_blocks_and_read_back_in_order() -> None:
    posted = signals(3000)
    data = formats.encode("avro", records(posted), None, "deflate")
    with io.BytesIO(data) as f:
        assert len(list(fastavro.block_reader(f))) > 1
    _, rows = avro_rows(data)
    assert [row["id"] for row in rows] == [s["signal_id"]["$oid"] for s in posted]


# -- Parquet ----------------------------------------------------------------------------


def parquet_rows(data: bytes) -> list[dict[str, Any]]:
    return list(pq.read_table(io.BytesIO(data)).to_pylist())


def test_parquet_without_a_mapping_holds_the_envelope_and_the_signal(tmp_path: Path) -> None:
    posted = signals()
    data = formats.encode("parquet", records(posted), None, "snappy")
    table = pq.read_table(io.BytesIO(data))
    assert table.schema.names == ENVELOPE
    assert table.schema.field("time").type == pa.timestamp("us", tz="UTC")
    assert [table.schema.field(name).type for name in ENVELOPE if name != "time"] == [
        pa.string()
    ] * 5
    for row, signal in zip(table.to_pylist(), posted, strict=True):
        assert {k: v for k, v in row.items() if k != "signal"} == expected_envelope(signal)
        assert json.loads(row["signal"]) == signal
    # DuckDB reads the same cells.
    path = tmp_path / "batch.parquet"
    path.write_bytes(data)
    got = duckdb.sql(
        f"SELECT type, id, session, person, epoch_us(time), signal FROM read_parquet('{path}')"
    ).fetchall()
    assert got == [
        (
            s["type"],
            s["signal_id"]["$oid"],
            s.get("did"),
            s.get("pid"),
            round(moment(s).timestamp() * 1_000_000),
            msgspec.json.encode(s).decode(),
        )
        for s in posted
    ]


@pytest.mark.parametrize("compression", ["snappy", "zstd"])
def test_parquet_with_a_mapping_holds_its_columns_as_nullable_strings(
    tmp_path: Path, compression: str
) -> None:
    posted = signals()
    data = formats.encode("parquet", records(posted), Mapping(COLUMNS), compression)
    table = pq.read_table(io.BytesIO(data))
    assert table.schema.names == list(COLUMNS)
    assert {field.type for field in table.schema} == {pa.string()}
    assert table.to_pylist() == [expected_cells(signal) for signal in posted]
    metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    assert metadata.row_group(0).column(0).compression == compression.upper()
    path = tmp_path / "mapped.parquet"
    path.write_bytes(data)
    columns = ", ".join(COLUMNS)
    got = duckdb.sql(f"SELECT {columns} FROM read_parquet('{path}')").fetchall()
    assert got == [tuple(expected_cells(signal).values()) for signal in posted]


def test_parquet_is_one_row_group_and_the_same_bytes_for_the_same_batch() -> None:
    posted = signals(20_000)
    data = formats.encode("parquet", records(posted), None, "zstd")
    metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    assert (metadata.num_row_groups, metadata.num_rows) == (1, 20_000)
    assert formats.encode("parquet", records(posted), None, "zstd") == data
    assert formats.encode("parquet", records(posted[1:]), None, "zstd") != data


def test_parquet_of_a_cut_of_blocks_is_the_batch_of_the_same_records(tmp_path: Path) -> None:
    """A cut holds a request's records as a block (views of the segment's bytes, each
    record followed by a newline) and a single signal as a record of its own; the
    signal column is read from those bytes: small blocks joined, large ones alone."""
    posted = signals(2_000)
    plain = records(posted)
    cut, at = Rows(), 0
    for size in (1, 3, 300, 2, 1, 1, 700, 5, 250, 260, 1, 476):
        part = plain[at : at + size]
        if size == 1:
            cut.append(part[0])
        else:
            block = Block(
                1_790_000_000.0,
                part.types,
                part.ids,
                part.sessions,
                part.persons,
                part.times,
                part.raws,
                True,
            )
            joined = Joined.read(bytes(encoded_block(block)))
            cut.add_block(joined, 0, len(joined))
        at += size
    assert at == len(posted) == len(cut)
    for compression in ("snappy", "zstd"):
        data = formats.encode("parquet", cut, None, compression)
        assert data == formats.encode("parquet", plain, None, compression)
        table = pq.read_table(io.BytesIO(data))
        assert table.column("signal").to_pylist() == [raw.decode() for raw in plain.raws]
        assert table.column("id").to_pylist() == plain.ids


def queued(n: int, session: str | None, person: str | None, raw: bytes = b"") -> Record:
    return Record(
        "pd",
        f"id-{n}",
        session,
        person,
        1_790_000_000 + n / 8,
        1_790_000_100.0,
        raw or b'{"type":"pd","n":%d}' % n,
    )


@pytest.mark.parametrize("short", [False, True], ids=["viewed", "copied"])
def test_parquet_reads_every_column_a_block_head_packs(short: bool) -> None:
    """A block's head holds each string column joined by newlines, a None empty and
    marked: the file holds the very values, for a column all None, "" beside None,
    non-ASCII, a value that holds a newline (that column kept as a list), parts of
    blocks and records read one by one. The signals are views of the blocks' bytes, or
    copied when a record is too short for a view of it to point at it (`short`)."""
    twelve = b'{"n":123456}' if short else b""  # the longest value a view holds itself
    blocks = [
        [queued(n, f"s{n}", None) for n in range(6)],
        [queued(n, "" if n % 3 else None, "" if n % 2 else None) for n in range(6, 14)],
        [queued(n, "two\nlines" if n == 16 else f"s{n}", f"pé{n}") for n in range(14, 20)],
        [queued(n, f"s{n}", f"p{n}" if n % 2 else None, twelve * (n == 24)) for n in range(20, 30)],
    ]
    ones = [queued(30, None, "p30"), queued(31, "s31", None)]
    cut, expected = Rows(), []
    for made, (start, stop) in zip(blocks, [(0, 6), (2, 8), (0, 4), (3, 7)], strict=True):
        block = Block(
            1_790_000_100.0,
            *([getattr(r, name) for r in made] for name in ("type", "id", "session", "person")),
            [r.time for r in made],
            [r.raw for r in made],
            True,
        )
        joined = Joined.read(bytes(encoded_block(block)))
        cut.add_block(joined, start, stop)
        expected += made[start:stop]
        if len(expected) == 6:  # records read one by one between blocks
            for record in ones:
                cut.append(record)
            expected += ones
    table = pq.read_table(io.BytesIO(formats.encode("parquet", cut, None, "snappy")))
    assert table.schema == parquet.ENVELOPE_SCHEMA
    assert table.to_pylist() == [
        {
            "type": r.type,
            "id": r.id,
            "session": r.session,
            "person": r.person,
            "time": datetime.fromtimestamp(round(r.time * 1e6) / 1e6, UTC),
            "signal": r.raw.decode(),
        }
        for r in expected
    ]


# -- through a daemon ---------------------------------------------------------------------


def test_firehoses_deliver_avro_and_parquet_files_that_read_back_cell_by_cell(
    make_daemon,
) -> None:
    config = (
        MAPPING
        + firehose("av", format="avro")
        + firehose("avm", format="avro", mapping="cols", compression="none")
        + firehose("pq", format="parquet")
        + firehose("pqm", format="parquet", mapping="cols", compression="zstd")
    )
    daemon = make_daemon(config).start()
    posted = signals(12)
    post_ok(daemon, posted[:6])
    post_ok(daemon, posted[6:])

    def delivered(name: str) -> list[Path]:
        paths = files_of(daemon, name)
        rows = sum(count(path) for path in paths)
        return paths if rows >= len(posted) else []

    av, avm, pqe, pqm = (wait_until(lambda n=n: delivered(n)) for n in ("av", "avm", "pq", "pqm"))
    assert {p.suffix for p in av + avm} == {".avro"} and {p.suffix for p in pqe + pqm} == {
        ".parquet"
    }
    avro_all = [row for path in av for row in avro_rows(path.read_bytes())[1]]
    assert [json.loads(row.pop("signal")) for row in avro_all] == posted
    assert avro_all == [expected_envelope(signal) for signal in posted]
    avro_mapped = [row for path in avm for row in avro_rows(path.read_bytes())[1]]
    assert avro_mapped == [expected_cells(signal) for signal in posted]
    parquet_all = [row for path in pqe for row in parquet_rows(path.read_bytes())]
    assert [json.loads(row.pop("signal")) for row in parquet_all] == posted
    assert parquet_all == [expected_envelope(signal) for signal in posted]
    parquet_mapped = [row for path in pqm for row in parquet_rows(path.read_bytes())]
    assert parquet_mapped == [expected_cells(signal) for signal in posted]
    cut = {e["batch"]: e for e in daemon.events("batch.delivered")}
    assert all(path.name in cut for path in av + avm + pqe + pqm)


def count(path: Path) -> int:
    if path.suffix == ".avro":
        return len(avro_rows(path.read_bytes())[1])
    return int(pq.ParquetFile(path).metadata.num_rows)


@pytest.mark.parametrize("fmt", ["avro", "parquet"])
def test_a_cut_batch_keeps_its_name_and_bytes_across_a_crash(make_daemon, fmt: str) -> None:
    """Cut, refused by the channel, the daemon killed: after the restart the same name
    is delivered, holding exactly the bytes this batch encodes to anywhere."""
    daemon = make_daemon()
    daemon.write_config(blocked_channel(daemon, "fixed").replace('"ndjson"', f'"{fmt}"'))
    daemon.start()
    posted = signals(8)
    # As NDJSON of compact lines: each record's raw bytes are what records() makes.
    body = b"\n".join(msgspec.json.encode(signal) for signal in posted)
    post_ok(daemon, body, content_type="application/x-ndjson")
    (cut,) = wait_until(lambda: daemon.events("batch.cut"))
    wait_until(lambda: daemon.events("batch.failed"))
    daemon.kill()
    daemon.write_config(firehose("fixed", format=fmt))
    daemon.start()
    (path,) = wait_until(lambda: files_of(daemon, "fixed"))
    assert path.name == cut["batch"] and path.name.endswith(f".{fmt}")
    compression = formats.compression_for(fmt, None)
    assert path.read_bytes() == formats.encode(fmt, records(posted), None, compression)


def test_a_stream_channel_or_gzip_is_refused_for_avro_and_parquet(make_daemon) -> None:
    daemon = make_daemon(
        firehose("gz", format="avro", compression="gzip")
        + firehose("pz", format="parquet", compression="none")
        + '\n[channels.hook]\ntype = "webhook"\nurl = "https://example.com/in"\n'
        + '\n[firehoses.hooked]\naccount = "acme"\nchannel = "hook"\nformat = "parquet"\n'
    )
    checked = daemon.cli("check")
    assert checked.returncode == 2
    problems = checked.stderr.splitlines()
    assert any(
        "firehoses.gz.compression: avro compresses its blocks itself: use deflate (the "
        "default) or none, not gzip" in line
        for line in problems
    ), problems
    assert any(
        "firehoses.pz.compression: parquet compresses its pages itself" in p for p in problems
    )
    assert any(
        "firehoses.hooked.channel: channel 'hook' streams records: its files need a file "
        "channel" in line
        for line in problems
    ), problems
    assert len(problems) == 3
