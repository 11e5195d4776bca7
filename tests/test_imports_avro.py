"""Avro imports end to end: a real daemon pulls Avro files of several schemas and codecs,
one of them with a corrupt block, from moto's S3 and OpenSSH's SFTP, and every valid
record arrives once at a directory firehose; every row of the corrupt block is counted
and listed with the block's offset. Uploads (`Content-Type: application/avro`) and a
kill -9 mid-run go through the same reader.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.daemon import TOKEN, Daemon
from tests.servers.moto import moto_server
from tests.servers.sftp import OpensshServer, openssh_server
from tests.test_archive import sftp_channel
from tests.test_delivery_s3 import s3_client
from tests.test_import_avro import (
    FLAT,
    NESTED,
    blocks_of,
    data_start,
    flat_record,
    nested_record,
    write_avro,
)
from tests.test_imports import delivered_ids, finished_run, killed_midway_and_resumed, uploaded

__all__ = ["moto_server", "openssh_server"]

FIREHOSE = """
[firehoses.all]
account = "acme"
channel = "local"
format = "ndjson"
minutes_between_files = 0.02
"""
TASK = """
[imports.users]
account = "acme"
source = "{source}"
pattern = "{pattern}"
format = "avro"
once = true

[imports.users.columns]
type = "event"
id = "event_id"
person = "customer_id"
time = "at"
"""
# Orders: nested records, maps, an array of records, timestamps, bytes, unions.
ORDER = {**NESTED, "fields": [*NESTED["fields"], {"name": "event_id", "type": "string"}]}


def order(n: int) -> dict[str, Any]:
    return {**nested_record(n), "event_id": f"o{n}", "customer_id": f"cust{n % 50}"}


@dataclass
class Batch:
    """The files a run takes, and what the firehose must get from them."""

    files: dict[str, bytes] = field(default_factory=dict)
    valid: set[str] = field(default_factory=set)  # delivered signal ids
    no_person: int = 0  # rows refused for their content
    corrupt_rows: int = 0  # rows of the corrupt block
    corrupt_offset: int = 0


def make_batch(tmp_path: Path) -> Batch:
    """Three files: flat records (deflate, some without a person), nested orders
    (snappy), and flat records (deflate) with one block that does not inflate."""
    batch = Batch()
    work = tmp_path / "made"
    work.mkdir()
    flat = [flat_record(n) for n in range(1, 3001)]
    batch.files["users-1.avro"] = write_avro(work / "1.avro", FLAT, flat).read_bytes()
    batch.valid |= {str(r["event_id"]) for r in flat if r["customer_id"]}
    batch.no_person += sum(1 for r in flat if not r["customer_id"])
    orders = [order(n) for n in range(1, 801)]
    path = write_avro(work / "2.avro", ORDER, orders, codec="snappy")
    batch.files["users-2.avro"] = path.read_bytes()
    batch.valid |= {r["event_id"] for r in orders}
    damaged = [flat_record(n) for n in range(5001, 7001)]
    path = write_avro(work / "3.avro", FLAT, damaged)
    blocks = blocks_of(path)
    offset, _, count = blocks[4]
    data = bytearray(path.read_bytes())
    data[data_start(data, offset)] = 0xFF  # a deflate block of the reserved type
    batch.files["users-3.avro"] = bytes(data)
    first = sum(b[2] for b in blocks[:4])
    lost = damaged[first : first + count]
    batch.valid |= {str(r["event_id"]) for r in damaged if r["customer_id"] and r not in lost}
    batch.no_person += sum(1 for r in damaged if not r["customer_id"] and r not in lost)
    batch.corrupt_rows, batch.corrupt_offset = count, offset
    return batch


def errored_rows(tmp_path: Path) -> list[dict[str, str]]:
    (errors_file,) = (tmp_path / "var" / "imports" / "users" / "runs").glob("*/errors.csv")
    return list(csv.DictReader(io.StringIO(errors_file.read_text(), newline="")))


def check_run(daemon: Daemon, tmp_path: Path, batch: Batch) -> None:
    run = finished_run(daemon, "users", timeout=90)
    assert run["fetch"]["status"] == "fetched", run
    assert sorted(f["name"].rsplit("/", 1)[-1] for f in run["files"]) == sorted(batch.files)
    bad = batch.no_person + batch.corrupt_rows
    assert run["processing"]["status"] == "processed"
    assert run["processing"]["rows"] == 3000 + 800 + 2000
    assert (run["processing"]["imported"], run["processing"]["errored"]) == (len(batch.valid), bad)
    assert delivered_ids(daemon, len(batch.valid)) == Counter(batch.valid)
    listed = errored_rows(tmp_path)
    corrupt = [e for e in listed if e["reason"].startswith("corrupt Avro block")]
    assert len(corrupt) == batch.corrupt_rows
    assert {e["file"].rsplit("/", 1)[-1] for e in corrupt} == {"users-3.avro"}
    assert all(f"at byte {batch.corrupt_offset} " in e["reason"] for e in corrupt)
    assert {e["column"] for e in listed if e not in corrupt} == {"customer_id"}
    (order_3,) = [r for r in daemon.delivered() if r["signal_id"]["$oid"] == "o3"]
    assert order_3 == {
        "type": "purchase",
        "signal_id": {"$oid": "o3"},
        "pid": "cust3",
        "evdt": {"$date": "2026-12-04T10:00:04.500000Z"},
        "address": {"city": "Lyon", "geo": {"lat": 45.75, "lon": 4.85}},
        "labels": {"source": "mail", "campaign": "c-0"},
        "items": [{"sku": "sku-3", "digest": "A/8=", "price": 9.9}],
        "tags": ["a", "b"],
        "ship_to": {"city": "Paris"},
        "token": "AAECAw==",
        "raw": "aGk=",
        "day": "2026-12-04",
        "opens": "09:30:00",
        "seen": "2026-12-04T10:00:00.000003Z",
        "local": "2026-12-04T11:00:00",
        "ref": "00000000-0000-0000-0000-000000000003",
    }


def test_avro_files_pulled_from_s3_arrive_once_and_a_corrupt_block_is_counted(
    tmp_path: Path, moto_server: str
) -> None:
    batch = make_batch(tmp_path)
    bucket = f"avro-{uuid.uuid4().hex[:12]}"
    s3 = s3_client(moto_server)
    try:
        s3.create_bucket(Bucket=bucket)
        for name, data in batch.files.items():
            s3.put_object(Bucket=bucket, Key=f"in/acme/{name}", Body=data)
        s3.put_object(Bucket=bucket, Key="in/acme/users.csv", Body=b"not,taken\n")
    finally:
        s3.close()
    channel = f"""
[channels.remote]
type = "s3"
bucket = "{bucket}"
prefix = "in/{{account}}/"
endpoint_url = "{moto_server}"
addressing_style = "path"
access_key_id = "testing"
secret_access_key = "testing"
"""
    daemon = Daemon(
        tmp_path, FIREHOSE + channel + TASK.format(source="remote", pattern="users-*.avro")
    )
    try:
        daemon.start()
        check_run(daemon, tmp_path, batch)
    finally:
        daemon.close()


def test_avro_files_pulled_over_sftp_arrive_once_and_a_corrupt_block_is_counted(
    tmp_path: Path, openssh_server: OpensshServer
) -> None:
    batch = make_batch(tmp_path)
    channel, _ = sftp_channel(tmp_path, openssh_server)
    remote = tmp_path / "remote" / "exports"
    remote.mkdir(parents=True)
    for name, data in batch.files.items():
        (remote / name).write_bytes(data)
    # The Amperity spelling of the same files: a literal part in quotes, date fields.
    pattern = "'exports/users'-*'.avro'"
    task = TASK.format(source="out", pattern=pattern)
    daemon = Daemon(tmp_path, FIREHOSE + channel + task)
    try:
        daemon.start()
        check_run(daemon, tmp_path, batch)
    finally:
        daemon.close()


UPLOADS = """
[imports.uploads]
account = "acme"
format = "avro"

[imports.uploads.columns]
type = "event"
id = "event_id"
person = "customer_id"
time = "at"
"""


def test_an_avro_upload_is_processed_like_a_pulled_file(tmp_path: Path) -> None:
    records = [flat_record(n) for n in range(1, 1001)]
    body = write_avro(tmp_path / "up.avro", FLAT, records).read_bytes()
    valid = {str(r["event_id"]) for r in records if r["customer_id"]}
    daemon = Daemon(tmp_path, FIREHOSE + UPLOADS)
    url = f"{daemon.url}/v1/accounts/acme/imports"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/avro"}
    try:
        daemon.start()
        _, document = uploaded(daemon, "uploads", body, headers)
        assert document["processing"]["imported"] == len(valid)
        assert document["processing"]["errored"] == 1000 - len(valid)
        assert delivered_ids(daemon, len(valid)) == Counter(valid)
        # A CSV content type for an Avro task is refused, and says what the task reads.
        wrong = daemon.session.post(
            url,
            params={"columns": "uploads"},
            data=body,
            headers={**headers, "Content-Type": "text/csv"},
        )
        assert wrong.status_code == 415 and "reads avro" in wrong.json()["error"]
    finally:
        daemon.close()


ONCE_DIRECTORY = """
[channels.remote]
type = "directory"
path = "{root}/inbox"
"""


def test_kill_9_mid_avro_run_resumes_and_every_record_arrives_exactly_once(
    tmp_path: Path,
) -> None:
    (tmp_path / "inbox").mkdir()
    records = [flat_record(n) for n in range(1, 200_001)]
    write_avro(tmp_path / "inbox" / "users-1.avro", FLAT, records, sync_interval=64_000)
    valid = {str(r["event_id"]) for r in records if r["customer_id"]}
    config = (
        FIREHOSE
        + ONCE_DIRECTORY.format(root=tmp_path)
        + TASK.format(source="remote", pattern="users-*.avro")
    )
    daemon = Daemon(tmp_path, config)
    try:
        run = killed_midway_and_resumed(daemon, "users", 200_000)
        assert run["processing"]["errored"] == 200_000 - len(valid)
        ids = delivered_ids(daemon, len(valid), timeout=120)
        assert ids == Counter(valid), "every valid record once: none lost, none doubled"
    finally:
        daemon.close()
