"""The daily archive's zip: one CSV per event type, streamed, memory bounded.

An archive is built from the records of one day, read per type twice: a first pass
learns the type's columns (the union of its records' flattened keys) and an upper bound
of its CSV size, the second writes the rows straight into the zip entry. Memory holds
the column set and one row, whatever the day's size.

Cells (DESIGN §6): `time` in ISO 8601 UTC; strings as they are; numbers and booleans as
their JSON text; null and missing keys empty. Keys are flattened in dotted form under
`Payload.`, arrays by index (`Payload.cart.p.0.prid`). A key that itself holds a dot or a
backslash has them escaped (`\\.`, `\\\\`), so `{"a.b": 1}` (`Payload.a\\.b`) and
`{"a": {"b": 2}}` (`Payload.a.b`) never share a column.

The bytes are a function of the records alone (entries in type order, fixed timestamps,
fixed compression level), so a build interrupted by a crash is rebuilt identical.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, BinaryIO

import msgspec

from firehosed.config import FieldsConfig
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

_decode = msgspec.json.Decoder().decode

Records = Callable[[], Iterable[Record]]  # a fresh pass over one type's records


@dataclass(frozen=True, slots=True)
class Summary:
    """What the first pass would learn of an entry, when known beforehand (its spills
    noted it): the flattened keys, the records and an upper bound of their bytes."""

    keys: set[str]
    rows: int
    size: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One CSV of the archive: its name in the zip, the records it holds, and their
    summary if known (then they are read once, not twice)."""

    name: str
    records: Records
    summary: Summary | None = None


def payload_keys(raw: bytes) -> list[str]:
    """The flattened keys of one record (noted with its spill, for `Summary.keys`)."""
    return list(flat(_decode(raw)))


class Columns:
    """The columns of one type's CSV: a mapping's, or the envelope's then every
    flattened payload key seen, sorted."""

    def __init__(self, fields: FieldsConfig, mapping: ColumnMapping | None) -> None:
        self.mapping = mapping
        self._skip = _envelope_paths(fields)
        self._keys: set[str] = set()
        self._order: list[str] | None = None

    def learn(self, record: Record) -> None:
        """Note the keys of `record` (first pass)."""
        if self.mapping is None:
            self._keys.update(flat(_decode(record.raw)).keys() - self._skip)

    def learn_keys(self, keys: set[str]) -> None:
        """Note keys known from a summary (no first pass)."""
        if self.mapping is None:
            self._keys.update(keys - self._skip)

    def header(self) -> list[str]:
        if self.mapping is not None:
            return list(self.mapping.columns)
        return [*ENVELOPE_COLUMNS, *(PAYLOAD + key for key in self._sorted())]

    def _sorted(self) -> list[str]:
        """The payload keys in column order (sorted once, after the first pass)."""
        if self._order is None or len(self._order) != len(self._keys):
            self._order = sorted(self._keys)
        return self._order

    def row(self, record: Record) -> list[str]:
        """The CSV cells of `record` under `header()` (second pass)."""
        if self.mapping is not None:
            return [cell(value) for value in self.mapping.values(_decode(record.raw))]
        cells = flat(_decode(record.raw))
        envelope = [
            record.type,
            record.id,
            record.session or "",
            record.person or "",
            datetime.fromtimestamp(record.time, UTC).isoformat().replace("+00:00", "Z"),
        ]
        return envelope + [cells.get(key, "") for key in self._sorted()]


def write(out: BinaryIO, entries: Sequence[Entry], columns: Callable[[], Columns]) -> int:
    """Write the zip of `entries` to `out` (seekable), streaming each CSV into it; the
    number of records (rows below the headers) written."""
    total = 0
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        for entry in entries:
            cols = columns()
            rows = bound = 0
            if entry.summary is not None:
                cols.learn_keys(entry.summary.keys)
                rows, bound = entry.summary.rows, entry.summary.size
            else:
                for record in entry.records():
                    cols.learn(record)
                    rows += 1
                    bound += len(record.raw) + len(record.id) + len(record.session or "")
            header = cols.header()
            # Each cell at most doubles (quotes) plus its quotes and comma; the envelope
            # cells are bounded by the record's own strings and a 32-byte time.
            bound = 2 * bound + rows * (3 * len(header) + 64) + 4 * sum(map(len, header))
            info = zipfile.ZipInfo(entry.name, date_time=ENTRY_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=bound >= ZIP64_LIMIT) as raw:
                _write_rows(raw, header, cols, entry.records())
            total += rows
    return total


def _write_rows(
    raw: IO[bytes], header: list[str], cols: Columns, records: Iterable[Record]
) -> None:
    text = io.TextIOWrapper(raw, encoding="utf-8", newline="", write_through=False)
    writer = csv.writer(text, lineterminator="\r\n")
    writer.writerow(header)
    for record in records:
        writer.writerow(cols.row(record))
    text.flush()
    text.detach()


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
