"""`csv`: RFC 4180, CRLF, UTF-8; a header row of the mapping's columns, in its order.

A missing path is an empty cell; a string is itself; a number or boolean is its JSON
text; an object or array is its compact JSON.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

import msgspec

from firehosed.mapping import MISSING, Mapping
from firehosed.record import Record


def encode(records: Sequence[Record], mapping: Mapping) -> bytes:
    """Header row, then one row per record."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(mapping.columns)
    decode = msgspec.json.decode
    for record in records:
        writer.writerow([cell(v) for v in mapping.values(decode(record.raw))])
    return out.getvalue().encode("utf-8")


def cell(value: Any) -> str:
    """The text of one CSV cell."""
    if value is MISSING or value is None:
        return ""
    if isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode("utf-8")
