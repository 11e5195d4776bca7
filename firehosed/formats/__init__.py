"""Batch file formats: each encodes a list of queued records into a file's bytes.

Records are written as received (raw bytes) unless the format needs their values
(CSV columns, JSON `mapped_fields`, Avro and Parquet columns); only then is a record
decoded, off the event loop.
"""

from __future__ import annotations

import gzip
import importlib
from collections.abc import Sequence

from firehosed.fileio import Data, Pieces
from firehosed.formats import avro, csv, json, ndjson
from firehosed.mapping import Mapping
from firehosed.record import Record, Rows

EXTENSIONS = {
    "json": ".json",
    "ndjson": ".ndjson",
    "csv": ".csv",
    "avro": ".avro",
    "parquet": ".parquet",
}
CONTENT_TYPES = {
    "json": "application/json",
    "ndjson": "application/x-ndjson",
    "csv": "text/csv",
    "avro": "application/avro",
    "parquet": "application/vnd.apache.parquet",
}
# The `compression` each format takes, its default first. Avro and Parquet compress
# inside the file (blocks, pages), so gzip around them is refused.
COMPRESSIONS = {
    "json": ("none", "gzip"),
    "ndjson": ("none", "gzip"),
    "csv": ("none", "gzip"),
    "avro": ("deflate", "none"),
    "parquet": ("snappy", "zstd"),
    "zip-csv": ("none",),
}


def compression_for(fmt: str, given: str | None) -> str:
    """A firehose's compression: as `given`, else its format's default."""
    return given or COMPRESSIONS[fmt][0]


def encode(fmt: str, records: Sequence[Record], mapping: Mapping | None, compression: str) -> bytes:
    """The bytes of one batch file in `fmt`, compressed as `compression` says."""
    if fmt == "avro":
        return avro.encode(records, mapping, compression)
    if fmt == "parquet":
        # Loaded by the first Parquet batch: pyarrow adds ~40 MiB to a process that
        # imports it, which a daemon without a Parquet firehose should not carry.
        parquet = importlib.import_module("firehosed.formats.parquet")
        data: bytes = parquet.encode(records, mapping, compression)
        return data
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


def encode_batch(
    fmt: str, records: Sequence[Record], mapping: Mapping | None, compression: str
) -> Data:
    """`encode`, as a cut makes a batch's bytes: a plain NDJSON batch of a queue's Rows
    is the pieces of the queue's blocks, written as they are (no copy)."""
    plain = fmt == "ndjson" and mapping is None and compression == "none"
    if plain and isinstance(records, Rows) and records.plain:
        return Pieces(records.pieces())
    return encode(fmt, records, mapping, compression)


def extension(fmt: str, compression: str) -> str:
    """File name extension for a format and compression, e.g. `.csv.gz`."""
    return EXTENSIONS[fmt] + (".gz" if compression == "gzip" else "")
