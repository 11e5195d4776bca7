"""`json`: one JSON array of the records; with a mapping, each gets `mapped_fields`."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from firehosed.mapping import Mapping
from firehosed.record import Record, raws


def encode(records: Sequence[Record], mapping: Mapping | None) -> bytes:
    """`[rec,rec,...]` with each record's raw bytes unchanged (unless mapped)."""
    if mapping is None:
        return b"".join((b"[", b",".join(raws(records)), b"]"))
    return b"[" + b",".join(with_mapped_fields(r.raw, mapping) for r in records) + b"]"


def with_mapped_fields(raw: bytes, mapping: Mapping) -> bytes:
    """The record with `"mapped_fields": {column: value}` added as its last key."""
    record = msgspec.json.decode(raw)
    record["mapped_fields"] = mapping.as_dict(record)
    return msgspec.json.encode(record)
