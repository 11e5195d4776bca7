"""The README's fallback-into-S3 example through the real daemon and a moto server,
and `firehosed check --connect` against it."""

from __future__ import annotations

import json
import uuid
from typing import Any

import boto3
import pytest

from tests.daemon import Daemon, signal_record
from tests.servers.moto import moto_server

__all__ = ["moto_server"]

S3_FALLBACK = """
[server]
listen = "127.0.0.1:{{port}}"

[storage]
dir = "{{dir}}/var"

[accounts.acme]
tokens = ["{{token}}"]

[fallback]
channel = "archive"
prefix = ""

[channels.archive]
type = "s3"
bucket = "{bucket}"
prefix = "{{{{account}}}}/Firehose/"
endpoint_url = "{endpoint}"
addressing_style = "path"
access_key_id = "testing"
secret_access_key = "testing"
"""


def s3_client(moto_server: str) -> Any:
    """A plain boto3 client of the moto server, to set up and inspect buckets."""
    return boto3.client(
        "s3",
        endpoint_url=moto_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def bucket(moto_server: str) -> str:
    name = f"fh-{uuid.uuid4().hex[:12]}"
    s3_client(moto_server).create_bucket(Bucket=name)
    return name


def objects(moto_server: str, bucket: str) -> dict[str, bytes]:
    s3 = s3_client(moto_server)
    listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def s3_daemon(make_daemon, endpoint: str, bucket: str) -> Daemon:
    base = S3_FALLBACK.format(bucket=bucket, endpoint=endpoint)
    daemon: Daemon = make_daemon(base=base)  # replaces the default base config
    return daemon


def test_fallback_firehose_writes_json_under_account_firehose(
    make_daemon, moto_server, bucket
) -> None:
    daemon = s3_daemon(make_daemon, moto_server, bucket).start()
    assert daemon.post([signal_record(n) for n in range(3)]).status_code == 202
    daemon.stop()  # the drain cuts and delivers the open batch
    stored = objects(moto_server, bucket)
    assert len(stored) == 1
    key, body = next(iter(stored.items()))
    assert key.startswith("acme/Firehose/firehose-") and key.endswith(".json")
    assert [r["signal_id"]["$oid"] for r in json.loads(body)] == [f"{n:024x}" for n in range(3)]


def test_check_connect_reports_each_channel(make_daemon, moto_server, bucket) -> None:
    good = s3_daemon(make_daemon, moto_server, bucket).cli("check", "--connect")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "channel archive: ok" in good.stdout
    bad = s3_daemon(make_daemon, moto_server, bucket + "-missing").cli("check", "--connect")
    assert bad.returncode == 1
    assert "channel archive: FAILED" in bad.stdout and "missing" in bad.stdout
