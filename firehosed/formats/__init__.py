"""Batch file formats: each encodes a list of queued records into a file's bytes.

Records are written as received (raw bytes) unless the format needs their values
(CSV columns, JSON `mapped_fields`); only then is a record decoded, off the event loop.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence

from firehosed.formats import csv, json, ndjson
from firehosed.mapping import Mapping
from firehosed.record import Record

EXTENSIONS = {"json": ".json", "ndjson": ".ndjson", "csv": ".csv"}
CONTENT_TYPES = {"json": "application/json", "ndjson": "application/x-ndjson", "csv": "text/csv"}


def encode(fmt: str, records: Sequence[Record], mapping: Mapping | None, compression: str) -> bytes:
    """The bytes of one batch file in `fmt`, gzipped when `compression` is "gzip"."""
    if fmt == "csv":
        if mapping is None:
            raise ValueError("csv needs a mapping")
        data = csv.encode(records, mapping)
    elif fmt == "ndjson":
        data = ndjson.encode(records, mapping)
    else:
        data = json.encode(records, mapping)
    if compression == "gzip":
        # mtime=0: the same batch always gives the same bytes (idempotent retries)
        return gzip.compress(data, compresslevel=6, mtime=0)
    return data


def extension(fmt: str, compression: str) -> str:
    """File name extension for a format and compression, e.g. `.csv.gz`."""
    return EXTENSIONS[fmt] + (".gz" if compression == "gzip" else "")
