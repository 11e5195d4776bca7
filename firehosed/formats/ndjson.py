"""`ndjson`: one record per line; with a mapping, each gets `mapped_fields`."""

from __future__ import annotations

from collections.abc import Sequence

from firehosed.formats.json import with_mapped_fields
from firehosed.mapping import Mapping
from firehosed.record import Record


def encode(records: Sequence[Record], mapping: Mapping | None) -> bytes:
    """Each record's raw bytes (or mapped form) followed by `\\n`."""
    if mapping is None:
        return b"".join(r.raw + b"\n" for r in records)
    return b"".join(with_mapped_fields(r.raw, mapping) + b"\n" for r in records)
