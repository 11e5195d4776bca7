"""`ndjson`: one record per line; with a mapping, each gets `mapped_fields`.

A record posted pretty-printed inside a JSON array carries newlines in its raw bytes;
only such records are compacted (whitespace outside strings removed), so every line
stays one record. Others are written byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from firehosed.formats.json import with_mapped_fields
from firehosed.mapping import Mapping
from firehosed.record import Record, Rows, raws


def encode(records: Sequence[Record], mapping: Mapping | None) -> bytes:
    """Each record's raw bytes (or mapped form) on its own line."""
    if mapping is None:
        if isinstance(records, Rows) and records.plain:  # known at ingest: one join
            return records.text()
        lines = [one_line(raw) for raw in raws(records)]
    else:
        lines = [with_mapped_fields(r.raw, mapping) for r in records]
    lines.append(b"")  # the last line ends with a newline too
    return b"\n".join(lines)  # one copy of the batch, not one per line and one more


def one_line(raw: bytes) -> bytes:
    """`raw` itself, or its compact form when it spans lines."""
    if b"\n" in raw or b"\r" in raw:
        return msgspec.json.format(raw, indent=-1)
    return raw
