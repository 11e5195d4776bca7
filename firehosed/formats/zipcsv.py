"""The daily archive's zip: one CSV per event type, streamed, memory bounded.

A day's CSV rows are made while the day runs: each queue batch of an archive firehose
is turned into one `Part` per type (`Columns.part`: the rows under the batch's own
columns) and spilled. At the end of the day the zip is assembled from the parts: the
type's columns are merged from the parts' headers (`day_header`), and a part whose
columns are the day's is copied into the zip entry as it is, the common case and as
fast as deflate itself; any other part is re-laid out row by row under the day's
columns. Memory holds one read chunk and one row, whatever the day's size.

Cells (DESIGN §6): `time` in ISO 8601 UTC; strings as they are; numbers and booleans as
their JSON text; null and missing keys empty. Keys are flattened in dotted form under
`Payload.`, arrays by index (`Payload.cart.p.0.prid`). A key that itself holds a dot or a
backslash has them escaped (`\\.`, `\\\\`), so `{"a.b": 1}` (`Payload.a\\.b`) and
`{"a": {"b": 2}}` (`Payload.a.b`) never share a column.

The bytes are a function of the parts alone (entries in type order, parts in queue
order, fixed timestamps, fixed compression level), so a build interrupted by a crash is
rebuilt identical.
"""

from __future__ import annotations

import csv
import io
import shutil
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, BinaryIO

import msgspec

from firehosed.fields import FieldsConfig
from firehosed.formats.csv import cell
from firehosed.mapping import Mapping as ColumnMapping
from firehosed.record import Record

ENVELOPE_COLUMNS = ("type", "id", "session", "person", "time")
PAYLOAD = "Payload."
# An entry whose CSV may reach this gets ZIP64 headers from the start: zipfile cannot add
# them once an entry is being streamed, and refuses to go past 4 GiB without them.
ZIP64_LIMIT = zipfile.ZIP64_LIMIT
# Zip entries carry a local date and time; a fixed one keeps a rebuild byte-identical.
ENTRY_TIME = (1980, 1, 1, 0, 0, 0)
COPY_CHUNK = 1 << 20  # bytes: a part is copied into its entry in pieces this big

_decode = msgspec.json.Decoder().decode


@dataclass(frozen=True, slots=True)
class Part:
    """Rows of one type's CSV (one queue batch's, as spilled): the columns they are
    laid out under, how many, their CSV bytes (no header row), and a way to read those
    bytes (a stream that raises ValueError at its end if they were damaged)."""

    header: list[str]
    rows: int
    size: int
    open: Callable[[], AbstractContextManager[BinaryIO]]


@dataclass(frozen=True, slots=True)
class Entry:
    """One CSV of the archive: its name in the zip and its parts, in order."""

    name: str
    parts: Sequence[Part]


class Columns:
    """Turns a type's records into CSV rows: under a mapping's columns, or the
    envelope's then every flattened payload key of the records, sorted."""

    def __init__(self, fields: FieldsConfig, mapping: ColumnMapping | None) -> None:
        self.mapping = mapping
        self._skip = _envelope_paths(fields)

    def part(self, records: Sequence[Record]) -> tuple[list[str], bytes]:
        """The header and CSV bytes (rows only, CRLF) of `records`, all of one type."""
        text = io.StringIO(newline="")
        writer = csv.writer(text, lineterminator="\r\n")
        if self.mapping is not None:
            values = self.mapping.values
            writer.writerows([cell(v) for v in values(_decode(r.raw))] for r in records)
            return list(self.mapping.columns), text.getvalue().encode()
        cells = [flat(_decode(r.raw)) for r in records]
        keys = sorted(set().union(*cells) - self._skip)
        writer.writerows(
            [
                r.type,
                r.id,
                r.session or "",
                r.person or "",
                datetime.fromtimestamp(r.time, UTC).isoformat().replace("+00:00", "Z"),
                *[got.get(key, "") for key in keys],
            ]
            for r, got in zip(records, cells, strict=True)
        )
        return [*ENVELOPE_COLUMNS, *(PAYLOAD + key for key in keys)], text.getvalue().encode()


def day_header(headers: Sequence[Sequence[str]]) -> list[str]:
    """The columns of a type's CSV for the day, from its parts' headers (oldest first).

    Without a mapping: the envelope, then the union of the parts' payload columns,
    sorted. A mapping changed during the day (a reload): the newest part's columns, then
    any column of an older part that they lack, newest first, so no cell is dropped.
    """
    first = headers[0]
    if all(h == first for h in headers):
        return list(first)
    if all(_plain(h) for h in headers):
        payload = {column for h in headers for column in h[len(ENVELOPE_COLUMNS) :]}
        return [*ENVELOPE_COLUMNS, *sorted(payload)]
    out = list(headers[-1])
    seen = set(out)
    for h in reversed(headers[:-1]):
        for column in h:
            if column not in seen:
                seen.add(column)
                out.append(column)
    return out


def _plain(header: Sequence[str]) -> bool:
    """A header made without a mapping (envelope, then payload columns)."""
    n = len(ENVELOPE_COLUMNS)
    return tuple(header[:n]) == ENVELOPE_COLUMNS and all(
        column.startswith(PAYLOAD) for column in header[n:]
    )


def write(out: BinaryIO, entries: Sequence[Entry]) -> int:
    """Write the zip of `entries` to `out` (seekable), streaming each CSV into it; the
    number of records (rows below the headers) written."""
    total = 0
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for entry in entries:
            header = day_header([part.header for part in entry.parts])
            head = _row(header)
            # A re-laid-out part gains at most a comma per added column in each row.
            bound = len(head) + sum(
                part.size + (0 if part.header == header else part.rows * len(header))
                for part in entry.parts
            )
            info = zipfile.ZipInfo(entry.name, date_time=ENTRY_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=bound >= ZIP64_LIMIT) as raw:
                raw.write(head)
                for part in entry.parts:
                    with part.open() as data:
                        if part.header == header:
                            shutil.copyfileobj(data, raw, COPY_CHUNK)
                        else:
                            _relayout(data, part.header, header, raw)
                    total += part.rows
    return total


def _row(cells: Sequence[str]) -> bytes:
    text = io.StringIO(newline="")
    csv.writer(text, lineterminator="\r\n").writerow(cells)
    return text.getvalue().encode()


def _relayout(data: BinaryIO, columns: list[str], header: list[str], out: IO[bytes]) -> None:
    """Copy CSV rows laid out under `columns` into `out` under `header` (a superset)."""
    at = {column: n for n, column in enumerate(header)}
    places = [at[column] for column in columns]
    width = len(header)
    source = io.TextIOWrapper(data, encoding="utf-8", newline="")
    target = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=False)
    writer = csv.writer(target, lineterminator="\r\n")
    for row in csv.reader(source):
        cells = [""] * width
        for place, value in zip(places, row, strict=True):
            cells[place] = value
        writer.writerow(cells)
    target.flush()
    target.detach()
    source.detach()


def flat(value: Any) -> dict[str, str]:
    """{dotted key: cell} of every leaf of a decoded record; an empty object or array is
    a leaf of its own (`{}`, `[]`), so its key is not lost."""
    out: dict[str, str] = {}
    if type(value) is dict:
        _flatten(value, "", out)
    return out


def _flatten(node: dict[str, Any], prefix: str, out: dict[str, str]) -> None:
    """Leaves of an object into `out` (the hot path of a build: one call per object or
    array, not per leaf; no isinstance per leaf)."""
    for key, item in node.items():
        name = prefix + (_escape(key) if "." in key or "\\" in key else key)
        kind = type(item)
        if kind is str:
            out[name] = item
        elif kind is dict:
            if item:
                _flatten(item, name + ".", out)
            else:
                out[name] = "{}"
        elif kind is list:
            if item:
                _flatten_list(item, name + ".", out)
            else:
                out[name] = "[]"
        else:
            out[name] = _scalar(item, kind)


def _flatten_list(node: list[Any], prefix: str, out: dict[str, str]) -> None:
    """`_flatten` for an array: the same body over (index, item), repeated on purpose: a
    shared per-leaf helper costs a call per leaf, the build's hottest line."""
    for index, item in enumerate(node):
        name = f"{prefix}{index}"
        kind = type(item)
        if kind is str:
            out[name] = item
        elif kind is dict:
            if item:
                _flatten(item, name + ".", out)
            else:
                out[name] = "{}"
        elif kind is list:
            if item:
                _flatten_list(item, name + ".", out)
            else:
                out[name] = "[]"
        else:
            out[name] = _scalar(item, kind)


def _scalar(value: Any, kind: type) -> str:
    """A number, boolean or null as its cell (the JSON text; null empty)."""
    if kind is int:
        return str(value)
    if kind is bool:
        return "true" if value else "false"
    return cell(value)


def _escape(key: str) -> str:
    return key.replace("\\", "\\\\").replace(".", "\\.") if "." in key or "\\" in key else key


def _envelope_paths(fields: FieldsConfig) -> frozenset[str]:
    """Flattened keys that are envelope fields (their own columns), with the plain
    form of a `$oid`/`$date` wrapper (`signal_id` as well as `signal_id.$oid`)."""
    paths = set()
    for path in (fields.type, fields.id, fields.session, fields.person, fields.time):
        paths.add(path)
        parent, _, leaf = path.rpartition(".")
        if leaf in ("$oid", "$date") and parent:
            paths.add(parent)
    return frozenset(paths)


def entry_names(
    types: Iterable[str], day_stamp: str, names: Mapping[str, str]
) -> list[tuple[str, str]]:
    """(type, CSV name) for each type, sorted by type: `{event name}_{DDMMYYYY}.csv`.

    `event_names` are checked by `firehosed check`; a type without one is its own name,
    with any character that a file name cannot hold (`/ \\ : * ? " < > |`, control
    characters) replaced by `_`, so that no entry unpacks outside its folder.
    """
    return [(kind, f"{names.get(kind) or _safe(kind)}_{day_stamp}.csv") for kind in sorted(types)]


def _safe(kind: str) -> str:
    return "".join("_" if c in UNSAFE or c < " " or c == "\x7f" else c for c in kind)


UNSAFE = frozenset('/\\:*?"<>|')
