"""`avro`: one Avro object container file per batch, its schema in its header.

With a mapping, a record `firehosed.MappedSignal` of the mapping's columns, in order,
each a nullable string (formats/table.py says what a cell holds). Without, a record
`firehosed.Signal` of the envelope: `type` and `id` strings, `session` and `person`
nullable strings, `time` a long `timestamp-micros` (UTC), `signal` the record's JSON as
received. Blocks are deflated unless `compression = "none"` (codec null).

The bytes are a function of the batch alone: the header holds only the schema and the
codec, and the sync marker, random in most writers, is a hash of the records' ids. So
a batch encoded again (a retry, a recovery) is the same file.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

import fastavro

from firehosed.formats.table import as_rows, mapped_rows, micros
from firehosed.mapping import Mapping
from firehosed.record import Record

CODECS = {"deflate": "deflate", "none": "null"}  # the firehose's compression: Avro codec
SYNC_SIZE = 16
NULLABLE = ["null", "string"]
ENVELOPE_SCHEMA = fastavro.parse_schema(
    {
        "type": "record",
        "name": "Signal",
        "namespace": "firehosed",
        "fields": [
            {"name": "type", "type": "string"},
            {"name": "id", "type": "string"},
            {"name": "session", "type": NULLABLE, "default": None},
            {"name": "person", "type": NULLABLE, "default": None},
            {"name": "time", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "signal", "type": "string"},
        ],
    }
)


def encode(records: Sequence[Record], mapping: Mapping | None, compression: str) -> bytes:
    """The container file of a batch; `compression` is "deflate" or "none"."""
    out = io.BytesIO()
    if mapping is None:
        schema, items = ENVELOPE_SCHEMA, _envelopes(records)
    else:
        schema, items = _mapped_schema(tuple(mapping.columns)), _mapped(records, mapping)
    fastavro.writer(out, schema, items, codec=CODECS[compression], sync_marker=sync_marker(records))
    return out.getvalue()


def sync_marker(records: Sequence[Record]) -> bytes:
    """16 bytes that depend on the batch's records only: a hash of their ids, in order.
    (The ids tell one batch from another as well as the records' bytes would, at a tenth
    of the cost of hashing those; a marker only has to look random to the data.)"""
    ids = as_rows(records).ids
    return hashlib.blake2b("\0".join(ids).encode(), digest_size=SYNC_SIZE).digest()


@lru_cache(maxsize=64)
def _mapped_schema(columns: tuple[str, ...]) -> Any:
    fields = [{"name": column, "type": NULLABLE, "default": None} for column in columns]
    return fastavro.parse_schema(
        {"type": "record", "name": "MappedSignal", "namespace": "firehosed", "fields": fields}
    )


def _envelopes(records: Sequence[Record]) -> Iterator[dict[str, Any]]:
    rows = as_rows(records)
    columns = rows.types, rows.ids, rows.sessions, rows.persons, rows.times, rows.raws
    for kind, id_, session, person, moment, raw in zip(*columns, strict=True):
        yield {
            "type": kind,
            "id": id_,
            "session": session,
            "person": person,
            "time": micros(moment),
            "signal": raw.decode("utf-8"),
        }


def _mapped(records: Sequence[Record], mapping: Mapping) -> Iterator[dict[str, Any]]:
    columns = mapping.columns
    for cells in mapped_rows(records, mapping):
        yield dict(zip(columns, cells, strict=True))
