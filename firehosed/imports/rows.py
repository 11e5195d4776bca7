"""Read an import file into rows, and make each valid row a signal.

An import file (CSV, NDJSON or a JSON array; gunzipped on the fly when its name ends in
`.gz`) is read as a stream: memory holds one row and the readers' buffers, whatever the
size of the file. Each row becomes a signal, the JSON object an HTTP POST would have
brought, so that every row `RowMaker` accepts is one `EnvelopeReader` accepts; it also
gives the envelope that reader would read from the signal, so the receiver need not read
it again.

Two kinds of fault (errors.py): a `RowError` is one row that cannot be imported, a
`FileError` a file that cannot be read at all. Row numbers count data rows from 1:
neither a CSV header nor a blank line is a row.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import zlib

# hashlib's own blake2b (it never takes BLAKE2 from OpenSSL): `import hashlib` would load
# OpenSSL's libcrypto, 3.7 MB of every import child's memory, for this one digest.
from _blake2 import blake2b
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from itertools import compress, islice, repeat
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeAlias, cast

import ijson
import msgspec

from firehosed.envelope import (
    MAX_FIELD_BYTES,
    MAX_TIME_BYTES,
    Envelope,
    Envelopes,
    RecordError,
    _check_length,
    _check_type,
    parse_time,
)
from firehosed.fields import FieldsConfig
from firehosed.imports.errors import FileError, RowError

__all__ = ["FORMATS", "FileError", "Row", "RowError", "RowMaker", "columns_problem", "read_rows"]

FORMATS = ("csv", "ndjson", "json", "avro")
ENVELOPE_FIELDS = ("type", "id", "session", "person", "time")
# The fields held as strings of at most MAX_FIELD_BYTES (type and time have their own rules).
BOUNDED_FIELDS = ("id", "session", "person")
MAX_CELL = 1 << 20  # characters in one CSV cell
MAX_ROW = 16 << 20  # bytes in one NDJSON line or JSON array element (about, for JSON)
READ_CHUNK = 1 << 16  # bytes read at a time where no line is wanted
ID_DIGEST = 12  # bytes of blake2b in a made id: 24 hex digits, the size of an ObjectId
# A str of at most this many characters is within MAX_FIELD_BYTES whatever it holds (4
# UTF-8 bytes per character at most), so most values cost one len() to check.
SURELY_SHORT = MAX_FIELD_BYTES // 4
# Column names and event types remembered as checked, per RowMaker: a file has few of
# each, and a hostile one with millions of distinct names, or long ones (a cell may
# hold MAX_CELL characters), must not grow memory. Bounded in entries and, all told,
# in characters (4 bytes each at most).
REMEMBERED = 10_000
REMEMBERED_SHAPES = 1_000  # the same for the sets of columns of a row
REMEMBERED_CHARS = 1 << 20

Row = tuple[int, dict[str, Any]]
_Stream: TypeAlias = "gzip.GzipFile | io.BufferedReader[Any]"  # a file open for reading bytes
Opener = Callable[[Path], io.RawIOBase]  # a file's bytes read otherwise than from disk


def read_rows(
    path: Path,
    fmt: str,
    *,
    max_cell: int = MAX_CELL,
    max_row: int = MAX_ROW,
    after: int = 0,
    opener: Opener | None = None,
) -> Iterator[Row | RowError]:
    """Rows of a local file, in order: (row number, {column: value}) or a RowError for a
    row that cannot be read; raises FileError for a file that cannot be read at all.

    `fmt` is "csv", "ndjson", "json" or "avro" (imports/avro.py); a name ending in ".gz"
    is gunzipped on the fly. Rows up to `after` may be left out (a resumed run settled
    them): Avro passes over whole blocks of them undecoded.
    A CSV cell holds at most `max_cell` characters, an NDJSON line or a JSON element at
    most `max_row` bytes (a JSON element over it is a FileError: the array cannot be
    resumed after it). CSV values are strings, an empty cell is left out of its row;
    NDJSON and JSON values keep their JSON types, a number with a fraction or an
    exponent as a Decimal (exact). `opener` gives the file's bytes where the file is
    not read whole from disk (arriving.py: one still being fetched).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown import format {fmt!r}, expected one of {FORMATS}")
    with _file_faults(), _open(path, opener) as stream:
        if fmt == "csv":
            yield from _csv_rows(stream, max_cell)
        elif fmt == "ndjson":
            yield from _ndjson_rows(stream, max_row)
        elif fmt == "avro":
            # Here: fastavro is 8 MB of every reading process's memory (imports/child.py).
            from firehosed.imports.avro import avro_rows  # noqa: PLC0415

            yield from avro_rows(stream, after)
        else:
            yield from _json_rows(stream, max_row)


def read_csv_blocks(
    path: Path, size: int, *, max_cell: int = MAX_CELL, opener: Opener | None = None
) -> Iterator[CsvBlock | RowError]:
    """A CSV file's data rows as `read_rows` reads them, but in blocks of up to `size`
    rows of cells, to be made into signals in bulk (`RowMaker.block`); a row csv cannot
    parse is a RowError between two blocks. The checks `read_rows` makes of each row
    are left to `RowMaker.block`; raises FileError as `read_rows` does.

    csv reads the file's lines straight from the decoder. A row it cannot parse stops
    that reading: the file is read again from the start with each line watched, as
    `read_rows` reads it (`_watched_blocks`), and goes on from that row."""
    with _file_faults():
        with _open(path, opener) as stream:
            read = yield from _csv_blocks(stream, size, max_cell)
        if read is None:
            return
        with _open(path, opener) as stream:
            for item in _watched_blocks(stream, size, max_cell):
                if isinstance(item, RowError) or item.first > read:
                    yield item
                elif item.first + len(item.rows) - 1 > read:
                    skip = read - item.first + 1
                    yield item._replace(first=read + 1, rows=item.rows[skip:])


@contextmanager
def _file_faults() -> Iterator[None]:
    """Everything the file system or gzip can say about a file, as a FileError."""
    try:
        yield
    except EOFError as exc:
        raise FileError(f"truncated gzip: {exc}") from None
    except gzip.BadGzipFile as exc:
        raise FileError(f"not a valid gzip file: {exc}") from None
    except zlib.error as exc:
        raise FileError(f"corrupt gzip data: {exc}") from None
    except OSError as exc:
        raise FileError(f"cannot read the file: {exc.strerror or exc}") from None


@contextmanager
def _open(path: Path, opener: Opener | None) -> Iterator[_Stream]:
    """The file at `path` to read (gunzipped if its name ends in .gz), from disk or
    through `opener`."""
    with path.open("rb") if opener is None else io.BufferedReader(opener(path)) as raw:
        if path.name.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield unzipped
        else:
            yield raw


# CSV


def _csv_rows(stream: _Stream, max_cell: int) -> Iterator[Row | RowError]:
    """RFC 4180 rows under the header row's names. Bytes that are not UTF-8 are kept as
    surrogates by the decoder (never an exception part-way), so that the row holding
    them is the one refused."""
    csv_limits = _allow_cells(max_cell)
    with _csv_text(stream) as text:
        lines = _Lines(text)
        reader = csv.reader(lines.feed, strict=True)
        header = _header(reader)
        yield from _csv_records(reader, lines, header, None if csv_limits else max_cell)


def _csv_text(stream: _Stream, errors: str = "surrogateescape") -> io.TextIOWrapper:
    """The file's text. Bytes that are not UTF-8 are kept as surrogates."""
    return io.TextIOWrapper(stream, encoding="utf-8-sig", errors=errors, newline="")


_invalid_bytes = [0]  # runs of bytes that are not UTF-8 decoded by _MARK_INVALID, ever


def _mark_invalid(error: UnicodeError) -> tuple[str | bytes, int]:
    """surrogateescape, counting each use in `_invalid_bytes`."""
    _invalid_bytes[0] += 1
    return _surrogateescape(error)


_surrogateescape = codecs.lookup_error("surrogateescape")
_MARK_INVALID = "firehosed-csv-invalid"
codecs.register_error(_MARK_INVALID, _mark_invalid)


class CsvBlock(NamedTuple):
    """Data rows `first`, `first + 1`... of a CSV file, each the cells csv read, not yet
    checked against the header; `invalid` if a line among them held bytes that are not
    UTF-8; `max_cell` if cells are to be checked for length (csv's own limit is higher)."""

    header: list[str]
    first: int
    rows: list[list[str]]
    invalid: bool
    max_cell: int | None


def _csv_blocks(stream: _Stream, size: int, max_cell: int) -> Generator[CsvBlock, None, int | None]:
    """Blocks of the file's data rows, csv reading the decoder's lines unwatched; the
    number of the last row read when csv cannot parse the next (None at the end). A
    block is `invalid` once any bytes that are not UTF-8 have been decoded since the
    file was opened (by this reader or another: `_invalid_bytes` counts them all)."""
    check = None if _allow_cells(max_cell) else max_cell
    invalid_before = _invalid_bytes[0]
    with _csv_text(stream, errors=_MARK_INVALID) as text:
        reader = csv.reader(text, strict=True)
        header = _header(reader)
        number = 0  # the last row gone by
        while True:
            rows: list[list[str]] = []
            stopped = False
            try:
                rows.extend(islice(reader, size))  # keeps the rows before an error
            except csv.Error:
                stopped = True
            ended = len(rows) < size
            if [] in rows:  # blank lines
                rows = [cells for cells in rows if cells]
            if rows:
                invalid = _invalid_bytes[0] != invalid_before
                yield CsvBlock(header, number + 1, rows, invalid, check)
                number += len(rows)
            if stopped:
                return number
            if ended:
                return None


def _watched_blocks(stream: _Stream, size: int, max_cell: int) -> Iterator[CsvBlock | RowError]:
    """`_csv_rows`, a block of rows at a time: each line is watched on its way to csv,
    for the quotes' count a row csv cannot parse needs."""
    check = None if _allow_cells(max_cell) else max_cell
    with _csv_text(stream) as text:
        lines = _Lines(text)
        reader = csv.reader(lines.feed, strict=True)
        header = _header(reader)
        number = 0  # the last row gone by
        while True:
            rows: list[list[str]] = []
            append = rows.append
            lines.invalid = False
            quotes = lines.quotes  # as the row csv is reading started
            error = None
            try:
                for cells in reader:
                    if cells:  # not a blank line
                        append(cells)
                        if len(rows) == size:
                            break
                    quotes = lines.quotes
            except csv.Error as exc:
                error = exc
            if rows:
                yield CsvBlock(header, number + 1, rows, lines.invalid, check)
                number += len(rows)
            if error is not None:
                # csv drops the rest of the line; a quoted cell may go on over more lines.
                number += 1
                if not lines.skip_quoted(quotes):
                    raise FileError(f"a quote opened in row {number} is never closed")
                yield RowError(number, "", f"bad CSV: {error}")
            elif len(rows) < size:
                return


def _allow_cells(max_cell: int) -> bool:
    """Let csv read cells of `max_cell` characters; True if that is its limit (else it
    reads longer ones, to be refused here). csv's limit is process-wide: it is only ever
    raised, since another reader may need it as high as it is."""
    if csv.field_size_limit() < max_cell:
        csv.field_size_limit(max_cell)
    return csv.field_size_limit() == max_cell


class _Lines:
    """The text lines csv parses, watched on the way: how many quote characters went by
    (a row cut short by an error ends where its quotes balance) and whether a line held
    bytes that are not UTF-8. The csv reader consumes exactly one row's lines per row, so
    both can be read between two rows."""

    def __init__(self, text: IO[str]) -> None:
        self.quotes = 0
        self.invalid = False
        self.feed = self._watch(text)

    def _watch(self, text: IO[str]) -> Iterator[str]:
        for line in text:
            self.quotes += line.count('"')
            if not line.isascii() and not _is_utf8(line):
                self.invalid = True
            yield line

    def skip_quoted(self, quotes: int) -> bool:
        """Skip lines until the quotes counted since `quotes` balance; False at the end
        of the file first."""
        while (self.quotes - quotes) % 2:
            if next(self.feed, None) is None:
                return False
        return True


def _is_utf8(text: str) -> bool:
    """False if `text` holds surrogates: bytes the decoder could not read as UTF-8."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _header(reader: Iterator[list[str]]) -> list[str]:
    """The first non-blank row, as column names: each named, none twice."""
    try:
        header = next((cells for cells in reader if cells), None)
    except csv.Error as exc:
        raise FileError(f"unreadable header row: {exc}") from None
    if header is None:
        raise FileError("empty file: no header row")
    if not _is_utf8("".join(header)):
        raise FileError("the header row is not valid UTF-8")
    seen: set[str] = set()
    for index, name in enumerate(header, 1):
        if not name:
            raise FileError(f"column {index} of the header row has no name")
        if name in seen:
            raise FileError(f"column {name!r} appears twice in the header row")
        seen.add(name)
    return header


def _csv_records(
    reader: Iterator[list[str]], lines: _Lines, header: list[str], max_cell: int | None
) -> Iterator[Row | RowError]:
    """The data rows; `max_cell` when the cells' length is to be checked here."""
    number = 0
    while True:
        quotes = lines.quotes
        lines.invalid = False
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # csv drops the rest of the line; a quoted cell may go on over more lines.
            number += 1
            if not lines.skip_quoted(quotes):
                raise FileError(f"a quote opened in row {number} is never closed") from None
            yield RowError(number, "", f"bad CSV: {exc}")
            continue
        if not cells:  # a blank line
            continue
        number += 1
        yield _checked(number, header, cells, lines.invalid, max_cell)


def _checked(
    number: int, header: list[str], cells: list[str], invalid: bool, max_cell: int | None
) -> Row | RowError:
    """Data row `number` as {column: cell}, or why not: a cell for each column, each
    valid UTF-8 (`invalid` if they may not be) and, when `max_cell`, not over it."""
    if len(cells) != len(header):
        return RowError(number, "", f"{len(cells)} cells, the header has {len(header)}")
    if invalid and not _is_utf8("".join(cells)):
        return _invalid_cell(number, header, cells)
    if max_cell is None and "" not in cells:  # the common row, made the quickest way
        return number, dict(zip(header, cells))  # noqa: B905 - counted; strict= costs 40%
    return _csv_row(number, header, cells, max_cell)


def _csv_row(
    number: int, header: list[str], cells: list[str], max_cell: int | None
) -> Row | RowError:
    """A row of valid UTF-8 cells, one per column, as {column: cell}, empty cells left
    out; a RowError if a cell is over `max_cell` characters."""
    if max_cell is not None:
        for name, cell in zip(header, cells, strict=True):
            if len(cell) > max_cell:
                return RowError(number, name, f"cell over {max_cell} characters")
    return number, {name: cell for name, cell in zip(header, cells, strict=True) if cell}


def _invalid_cell(number: int, header: list[str], cells: list[str]) -> RowError:
    column = next(name for name, cell in zip(header, cells, strict=True) if not _is_utf8(cell))
    return RowError(number, column, "not valid UTF-8")


# NDJSON


# A number with a fraction or an exponent is read as a Decimal, as ijson reads them: kept
# exactly as written (no float rounding, no 1e400 turned into infinity) and written back
# as the same JSON number by `_encode`.
_decode_json = msgspec.json.Decoder(float_hook=Decimal).decode
_encode = msgspec.json.Encoder(decimal_format="number").encode


def _ndjson_rows(stream: _Stream, max_row: int) -> Iterator[Row | RowError]:
    """One JSON object per line, read a line at a time; blank lines are skipped."""
    number = 0
    line = stream.readline(max_row + 1).removeprefix(codecs.BOM_UTF8)
    while line:
        if len(line) > max_row:
            number += 1
            _skip_line(stream, line)
            yield RowError(number, "", f"line over {max_row} bytes")
        elif not line.isspace():
            number += 1
            yield _ndjson_row(number, line)
        line = stream.readline(max_row + 1)


def _skip_line(stream: _Stream, line: bytes) -> None:
    while line and not line.endswith(b"\n"):
        line = stream.readline(READ_CHUNK)


def _ndjson_row(number: int, line: bytes) -> Row | RowError:
    try:
        value = _decode_json(line)
    except msgspec.DecodeError as exc:
        return RowError(number, "", f"not JSON: {exc}")
    except RecursionError:
        return RowError(number, "", "not JSON: nested too deeply")
    if not isinstance(value, dict):
        return RowError(number, "", f"a JSON {_json_kind(value)}, not an object")
    return number, value


def _json_kind(value: Any) -> str:
    kinds = ((dict, "object"), (list, "array"), (str, "string"), (bool, "boolean"))
    if value is None:
        return "null"
    return next((name for kind, name in kinds if isinstance(value, kind)), "number")


# JSON array


class _RowTooLong(Exception):
    """Raised through ijson to stop at an element over the row limit."""


def _json_rows(stream: _Stream, max_row: int) -> Iterator[Row | RowError]:
    """The elements of a top-level array, parsed incrementally by ijson's C backend:
    one element is in memory at a time. A JSON syntax error cannot be resumed after,
    so it fails the file."""
    source = _ArraySource(stream, max_row)
    number = 0
    try:
        # Not `use_float=True`: with it ijson's C backend fails on integers over 64 bits.
        for value in ijson.items(source, "item"):
            number += 1
            source.row_read()
            if isinstance(value, dict):
                yield number, value
            else:
                yield RowError(number, "", f"a JSON {_json_kind(value)}, not an object")
    except ijson.JSONError as exc:
        where = f"after row {number}, in the first {source.offset} bytes"
        raise FileError(f"malformed JSON {where}: {_first_line(exc)}") from None
    except _RowTooLong:
        raise FileError(f"row {number + 1} is over {max_row} bytes") from None


class _ArraySource:
    """The file's bytes for ijson, checked on the way: the top level must be an array
    (ijson would find no element in an object and say nothing), and the bytes read since
    the last element (about one element's size) stay under the row limit."""

    def __init__(self, stream: _Stream, max_row: int) -> None:
        self._stream = stream
        self._max_row = max_row
        self._head = _array_start(stream)
        self.offset = 0  # bytes handed to ijson
        self._since_row = 0

    def read(self, size: int = -1) -> bytes:
        if self._head:
            data = self._head if size < 0 else self._head[:size]
            self._head = self._head[len(data) :]
        else:
            data = self._stream.read(size)
        self.offset += len(data)
        self._since_row += len(data)
        if self._since_row > self._max_row + READ_CHUNK:
            raise _RowTooLong
        return data

    def row_read(self) -> None:
        self._since_row = 0


def _array_start(stream: _Stream) -> bytes:
    """The file's first bytes from its first non-blank one, which must open an array."""
    data = stream.read(READ_CHUNK).removeprefix(codecs.BOM_UTF8)
    while data and not data.strip():
        data = stream.read(READ_CHUNK)
    data = data.lstrip()
    if not data:
        raise FileError("not a JSON array: the file is empty")
    if not data.startswith(b"["):
        kind = "an object" if data.startswith(b"{") else f"{data[:1].decode('latin-1')!r}"
        raise FileError(f"not a JSON array: it starts with {kind}")
    return data


def _first_line(exc: Exception) -> str:
    message = exc.args[0] if exc.args else ""
    if isinstance(message, bytes):
        message = message.decode(errors="replace")
    return str(message).split("\n", 1)[0]


# Signals


class _Fault(Exception):
    """A row is refused: the column at fault and why (becomes a RowError)."""

    def __init__(self, column: str, reason: str) -> None:
        super().__init__(reason)
        self.column = column
        self.reason = reason


class RowMaker:
    """Turns rows of one task into signals (JSON bytes), each one `EnvelopeReader`
    accepts.

    `columns` maps an envelope field (type, id, session, person, time) to the column
    that holds it; a field not mapped is read from a column of its own name (one column
    for two fields is a ValueError). Each envelope value goes at the account's path for
    its field (`fields`); every other column becomes a payload key, a dotted name
    nesting (`cart.total` gives `{"cart": {"total": ...}}`). A payload column where an
    envelope value goes (`did` when sessions are at `did`), or inside another column's
    value (`a.b` beside `a`), makes a RowError: it would change or lose a value.

    A row needs a type (1 to 64 characters, no ".", not all digits) and a person or a
    session. Its time must be ISO 8601 as Python reads it (`datetime.fromisoformat`:
    a date alone, `Z` or an offset, fractions of a second; no offset means UTC), the
    same rule as an HTTP POST's; it is kept as written. A row without a time gets the
    import's (`now`). A row without an id gets one made from the task, the file's
    version and the row number, so that importing the same file again adds nothing
    (signals are deduplicated by id).
    """

    def __init__(self, task: str, columns: dict[str, str], fields: FieldsConfig) -> None:
        self._task = task
        self._sources = _sources(columns)
        self._paths = {name: getattr(fields, name).split(".") for name in ENVELOPE_FIELDS}
        # Each field's path as (the dicts on the way, the key in the last one).
        self._places = {name: (path[:-1], path[-1]) for name, path in self._paths.items()}
        self._plain: set[str] = set()  # payload columns known to stay at the top level
        # The moves that nest the columns of rows of one shape (their keys, in order).
        self._shapes: dict[tuple[str, ...], list[tuple[str, list[str], str]]] = {}
        self._types: set[str] = set()  # event types known to be valid
        self._remembered = 0  # characters of the names and types above
        self._now = float("nan")
        self._now_text = ""
        self._now_moment = 0.0
        # How the rows under the last header met are made in bulk (a file has one).
        self._bulk_of: tuple[list[str], _Bulk | None] | None = None

    def record(
        self, row: dict[str, Any], number: int, file_key: str, now: float
    ) -> bytes | RowError:
        """The signal of data row `number` of the file version `file_key`, imported at
        `now` (unix seconds); a RowError naming the column at fault if it has none."""
        made = self.signal(row, number, file_key, now)
        return made if isinstance(made, RowError) else made[0]

    def signal(
        self, row: dict[str, Any], number: int, file_key: str, now: float
    ) -> tuple[bytes, Envelope] | RowError:
        """`record`, with the envelope `EnvelopeReader` reads from the signal (its JSON
        holds no raw newline or carriage return: msgspec escapes them)."""
        try:
            signal = row.copy()
            envelope, moment = self._envelope(signal, number, file_key, now)
            if not signal.keys() <= self._plain:
                self._nest(signal)
            self._place(signal, envelope)
            raw = _encode(signal)
        except _Fault as fault:
            return RowError(number, fault.column, fault.reason)
        except UnicodeEncodeError:
            return RowError(number, "", "a string is not valid Unicode")
        except RecursionError:
            return RowError(number, "", "nested too deeply")
        read = Envelope(
            type=envelope["type"],
            id=envelope["id"],
            session=envelope.get("session"),
            person=envelope.get("person"),
            time=moment,
            id_assigned=False,
        )
        return raw, read

    def block(self, block: CsvBlock, file_key: str, now: float) -> Made:
        """The signals of a CSV block's rows, made in bulk: the same bytes and envelopes
        `signal` makes of each row, and the same RowErrors. Each check runs over a
        column at once; a row a check stops (cells not as many as the header's, not
        UTF-8, a type or time that is not valid, no person or session, a value long
        enough to be measured) is made by `signal`, as is every row of a task whose
        columns nest, or when cells are to be measured."""
        shape = None if block.max_cell is not None else self._bulk(block.header)
        if shape is None:
            return self._each(block, range(len(block.rows)), file_key, now)
        width = len(block.header)
        positions: Sequence[int] = range(len(block.rows))
        rows = block.rows
        if block.invalid or set(map(len, rows)) != {width}:
            positions = [
                i
                for i, cells in enumerate(rows)
                if len(cells) == width and (not block.invalid or _is_utf8("".join(cells)))
            ]
            rows = [rows[i] for i in positions]
        numbers = list(map(block.first.__add__, positions))
        made, stopped = self._bulk_rows(shape, rows, numbers, file_key, now)
        others = [number - block.first for number in stopped]
        if rows is not block.rows:
            taken = set(positions)
            others += [i for i in range(len(block.rows)) if i not in taken]
        if not others:
            return made
        return _merged(made, self._each(block, sorted(others), file_key, now))

    def _bulk_rows(
        self,
        shape: _Bulk,
        rows: list[list[str]],
        numbers: list[int],
        file_key: str,
        now: float,
    ) -> tuple[Made, list[int]]:
        """The signals of `rows` (numbered `numbers`), each with as many cells as the
        header; the numbers of the rows a check stopped (neither signals nor errors)."""
        if not rows:
            return _made(), []
        count = len(rows)
        columns: list[Sequence[str]] = list(zip(*rows, strict=True))
        nothing: Sequence[str] = list(repeat("", count))
        values = {
            name: nothing if index is None else columns[index]
            for name, index in shape.fields.items()
        }
        stopped = self._stopped(shape, values)
        self._import_time(now)
        times = _moments(values["time"], self._now_moment)
        if None in times:
            stopped.update(i for i, moment in enumerate(times) if moment is None)
        refused = [numbers[i] for i in sorted(stopped)]
        if stopped:
            keep = [True] * count
            for i in stopped:
                keep[i] = False
            columns = [list(compress(column, keep)) for column in columns]
            values = {name: list(compress(column, keep)) for name, column in values.items()}
            times = list(compress(times, keep))
            numbers = list(compress(numbers, keep))
        made_ids = [not value for value in values["id"]] if "" in values["id"] else None
        if made_ids is not None:
            values["id"] = [
                value or self._made_id(file_key, number)
                for value, number in zip(values["id"], numbers, strict=True)
            ]
        imported = [not value for value in values["time"]] if "" in values["time"] else None
        if imported is not None:
            values["time"] = [value or self._now_text for value in values["time"]]
        signals = shape.signals(columns, values, made_ids, imported)
        raws = _encode_lines(signals).split(b"\n")
        raws.pop()  # after the last newline
        envelopes = Envelopes(
            list(values["type"]),
            list(values["id"]),
            _nones(values["session"]),
            _nones(values["person"]),
            cast("list[float]", times),
            raws,
            None,
            True,
        )
        return Made(envelopes, numbers, []), refused

    def _stopped(self, shape: _Bulk, values: dict[str, Sequence[str]]) -> set[int]:
        """The rows (indexes in `values`' columns) a check stops, bar the time's."""
        stopped: set[int] = set()
        kinds = values["type"]
        refused = {kind for kind in set(kinds) - self._types if not self._valid_kind(kind)}
        if refused:
            stopped.update(i for i, kind in enumerate(kinds) if kind in refused)
        for name in BOUNDED_FIELDS:
            column = values[name]
            if max(map(len, column)) > SURELY_SHORT:
                stopped.update(i for i, value in enumerate(column) if len(value) > SURELY_SHORT)
        sessions, persons = values["session"], values["person"]
        for name in shape.nested:  # an empty value would leave an empty object
            stopped.update(_empty(values[name]))
        if "" in sessions and "" in persons:
            stopped.update(set(_empty(sessions)).intersection(_empty(persons)))
        return stopped

    def _valid_kind(self, kind: str) -> bool:
        """Whether an event type not seen before is valid (remembered if so)."""
        try:
            self._check_kind(kind or None)
        except _Fault:
            return False
        return True

    def _each(self, block: CsvBlock, positions: Iterable[int], file_key: str, now: float) -> Made:
        """The rows of `block` at `positions` made one by one, as `_csv_rows` and
        `signal` make them."""
        made = _made()
        header = block.header
        for i in positions:
            number = block.first + i
            row = _checked(number, header, block.rows[i], block.invalid, block.max_cell)
            if isinstance(row, RowError):
                made.errors.append(row)
                continue
            result = self.signal(row[1], number, file_key, now)
            if isinstance(result, RowError):
                made.errors.append(result)
            else:
                raw, envelope = result
                made.signals.append(envelope, raw)
                made.numbers.append(number)
        return made

    def _bulk(self, header: list[str]) -> _Bulk | None:
        """How rows under `header` are made in bulk; None if they are not."""
        if self._bulk_of is not None and self._bulk_of[0] == header:
            return self._bulk_of[1]
        index = {name: i for i, name in enumerate(header)}
        fields = {name: index.get(column) for name, column in self._sources.items()}
        payload = [i for i, name in enumerate(header) if name not in self._sources.values()]
        nested = [name for name in ("session", "person") if len(self._paths[name]) > 1]
        try:
            nests = bool(self._plan(tuple(header[i] for i in payload)))
        except _Fault:  # a row with a value in that column is refused: `signal` says why
            nests = True
        usable = (
            not nests
            and fields["type"] is not None
            and (fields["session"] is not None or fields["person"] is not None)
            and all(fields[name] is not None for name in nested)
        )
        bulk = _Bulk(header, fields, payload, self._paths, nested) if usable else None
        self._bulk_of = (header, bulk)
        return bulk

    def _envelope(
        self, signal: dict[str, Any], number: int, file_key: str, now: float
    ) -> tuple[dict[str, str], float]:
        """The row's envelope values, taken out of `signal`, checked, completed; and its
        time in unix seconds."""
        values = self._take(signal)
        kind = values.get("type")
        if kind not in self._types:
            self._check_kind(kind)
        if "session" not in values and "person" not in values:
            raise _Fault(self._column("person"), "no person or session identifier")
        if "id" not in values:
            values["id"] = self._made_id(file_key, number)
        if "time" not in values:
            values["time"] = self._import_time(now)
            return values, self._now_moment
        try:
            return values, parse_time(values["time"])
        except RecordError as exc:
            raise _Fault(self._column("time"), str(exc)) from None

    def _take(self, signal: dict[str, Any]) -> dict[str, str]:
        """The envelope values present and not empty, removed from `signal`; a JSON
        integer as its text. Those of id, session and person are checked for length."""
        values = {}
        for name, column in self._sources.items():
            value = signal.pop(column, None)
            if not isinstance(value, str):
                if value is None:
                    continue
                value = self._text(name, value)
            if value:
                if len(value) > SURELY_SHORT and name in BOUNDED_FIELDS:
                    try:
                        _check_length(name, value)
                    except RecordError as exc:
                        raise _Fault(self._column(name), str(exc)) from None
                values[name] = value
        return values

    def _text(self, name: str, value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and name != "time":
            return str(value)
        expected = "an ISO 8601 string" if name == "time" else "a string"
        raise _Fault(self._column(name), f"{name} must be {expected}, not a {_json_kind(value)}")

    def _check_kind(self, kind: str | None) -> None:
        """Check an event type not seen before, and remember it."""
        if kind is None:
            raise _Fault(self._column("type"), "no type")
        try:
            _check_type(kind)
        except RecordError as exc:
            raise _Fault(self._column("type"), str(exc)) from None
        if len(self._types) < REMEMBERED and self._may_remember(len(kind)):
            self._types.add(kind)

    def _may_remember(self, chars: int) -> bool:
        """Whether names or types of `chars` characters more fit in REMEMBERED_CHARS
        (counted if so): past it, what is not remembered is checked again each time."""
        if self._remembered + chars > REMEMBERED_CHARS:
            return False
        self._remembered += chars
        return True

    def _column(self, name: str) -> str:
        return self._sources[name]

    def _made_id(self, file_key: str, number: int) -> str:
        key = f"{self._task}\0{file_key}\0{number}".encode()
        return blake2b(key, digest_size=ID_DIGEST).hexdigest()

    def _import_time(self, now: float) -> str:
        """`now` in ISO 8601 UTC with milliseconds and `Z`, rendered once per value (and
        read back as unix seconds: what a reader of the text gets)."""
        if now != self._now:
            moment = datetime.fromtimestamp(now, UTC)
            self._now_text = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            self._now_moment = parse_time(self._now_text)
            self._now = now
        return self._now_text

    def _place(self, signal: dict[str, Any], envelope: dict[str, str]) -> None:
        """Set each envelope value at its field's path, making the dicts on the way."""
        for name, value in envelope.items():
            parents, key = self._places[name]
            node = signal
            for segment in parents:
                node = node.setdefault(segment, {})
            node[key] = value

    def _nest(self, signal: dict[str, Any]) -> None:
        """Move the dotted payload columns of `signal` to their nested places."""
        shape = tuple(signal)
        moves = self._shapes.get(shape)
        if moves is None:
            moves = self._plan(shape)
            if len(self._shapes) < REMEMBERED_SHAPES and self._may_remember(sum(map(len, shape))):
                self._shapes[shape] = moves
        for column, parents, key in moves:
            node = signal
            for segment in parents:
                node = node.setdefault(segment, {})
            node[key] = signal.pop(column)

    def _plan(self, columns: tuple[str, ...]) -> list[tuple[str, list[str], str]]:
        """The moves (column, the dicts on the way, key) that nest payload `columns`; a
        fault for a column at an envelope field's place, or inside another column's
        value: a column never merges into another, so whether a row's columns fit
        together depends on their names alone."""
        paths = {column: self._path(column) for column in columns}
        ends = {tuple(path): column for column, path in paths.items()}
        moves = []
        for column, path in paths.items():
            for depth in range(1, len(path)):
                other = ends.get(tuple(path[:depth]))
                if other is not None:
                    raise _Fault(column, f"would be inside column {other!r}")
            if len(path) > 1:
                moves.append((column, path[:-1], path[-1]))
            elif len(self._plain) < REMEMBERED and self._may_remember(len(column)):
                self._plain.add(column)
        return moves

    def _path(self, column: str) -> list[str]:
        """Where payload `column` goes: its dotted name split (kept whole if a part is
        empty); a fault if that is an envelope field's place (where an envelope value
        is, or could be)."""
        segments = column.split(".")
        path = segments if all(segments) else [column]
        for name, envelope_path in self._paths.items():
            depth = min(len(path), len(envelope_path))
            if path[:depth] == envelope_path[:depth]:
                where = ".".join(envelope_path)
                reason = f"lands on the {name} field ({where}): map it as {name} or rename it"
                raise _Fault(column, reason)
        return path


class Made(NamedTuple):
    """Rows made into signals: each signal's row number, and the rows refused."""

    signals: Envelopes
    numbers: list[int]
    errors: list[RowError]


def _made() -> Made:
    return Made(Envelopes([], [], [], [], [], [], None, True), [], [])


def _merged(one: Made, other: Made) -> Made:
    """Two sets of signals made from rows of one block, in the order of their rows."""
    if not other.numbers:
        one.errors.extend(other.errors)
        return one
    merged = _made()
    merged.errors.extend(one.errors + other.errors)
    for number, source, at in sorted(
        [(number, one, at) for at, number in enumerate(one.numbers)]
        + [(number, other, at) for at, number in enumerate(other.numbers)],
        key=itemgetter(0),
    ):
        signals = source.signals
        envelope = Envelope(
            signals.types[at],
            signals.ids[at],
            signals.sessions[at],
            signals.persons[at],
            signals.times[at],
            id_assigned=False,
        )
        merged.signals.append(envelope, signals.raws[at])
        merged.numbers.append(number)
    return merged


def _empty(column: Sequence[str]) -> Iterator[int]:
    """The indexes of the empty strings in `column` (found by C, one call each)."""
    at = -1
    with contextlib.suppress(ValueError):
        while True:
            at = column.index("", at + 1)
            yield at


def _nones(column: Sequence[str]) -> list[str | None]:
    """`column` with None for each empty string."""
    if "" not in column:
        return list(column)
    return [value or None for value in column]


def _moments(texts: Sequence[str], imported: float) -> list[float | None]:
    """Each time as unix seconds, as `parse_time` reads it: `imported` for an empty
    one, None for one it refuses."""
    if "" not in texts and max(map(len, texts)) <= MAX_TIME_BYTES:
        with contextlib.suppress(ValueError):  # else one at a time, below
            return _timestamps(list(map(datetime.fromisoformat, texts)))
    return [_moment(text, imported) for text in texts]


def _timestamps(moments: list[datetime]) -> list[float | None]:
    """Unix seconds of each; one without an offset is UTC."""
    if None in set(map(_tzinfo, moments)):
        moments = [m if m.tzinfo else m.replace(tzinfo=UTC) for m in moments]
    return list(map(datetime.timestamp, moments))


def _moment(text: str, imported: float) -> float | None:
    if not text:
        return imported
    try:
        return parse_time(text)
    except RecordError:
        return None


_tzinfo = attrgetter("tzinfo")
_encode_lines = msgspec.json.Encoder().encode_lines
# A Struct made for one shape of signal, and where each of its fields' values comes from:
# a column of the header (int), an envelope field's values (str), a nested Struct's.
_Node = tuple[type, list["int | str | _Node"]]


class _Bulk:
    """How rows under one header are made in bulk: which column holds each envelope
    field (None: none), the payload's columns, and for each order the envelope values
    can be placed in (an id or a time made here goes last, as `signal` places it), the
    Structs whose JSON is the signal `signal` makes, key for key. A field whose value is
    the empty string or None is left out, as an empty cell is."""

    def __init__(
        self,
        header: list[str],
        fields: dict[str, int | None],
        payload: list[int],
        paths: dict[str, list[str]],
        nested: list[str],
    ) -> None:
        self.fields = fields
        self.nested = nested  # session or person, when an empty one cannot be left out
        self._header = header
        self._payload = payload
        self._paths = paths
        self._nodes: dict[tuple[bool, bool], _Node] = {}

    def signals(
        self,
        columns: list[Sequence[str]],
        values: dict[str, Sequence[str]],
        made_ids: list[bool] | None,
        imported: list[bool] | None,
    ) -> list[Any]:
        """The signals of rows with these cells and envelope values, of which those in
        `made_ids` have an id made here and those in `imported` the import's time."""
        if made_ids is None and imported is None:  # every row brings its id and time
            return _objects(self._node(False, False), columns, values)
        count = len(values["type"])
        orders = list(
            zip(made_ids or repeat(False, count), imported or repeat(False, count), strict=False)
        )
        kinds = set(orders)
        if len(kinds) == 1:
            return _objects(self._node(*kinds.pop()), columns, values)
        signals: list[Any] = [None] * count
        for order in kinds:
            rows = [i for i, each in enumerate(orders) if each == order]
            part = [[column[i] for i in rows] for column in columns]
            part_values = {name: [column[i] for i in rows] for name, column in values.items()}
            made = _objects(self._node(*order), part, part_values)
            for i, signal in zip(rows, made, strict=True):
                signals[i] = signal
        return signals

    def _node(self, made_id: bool, import_time: bool) -> _Node:
        node = self._nodes.get((made_id, import_time))
        if node is None:
            # `signal` places the values a row brings in the fields' order, then a made
            # id, then the import's time.
            brought = [name for name in ENVELOPE_FIELDS if not (made_id and name == "id")]
            brought = [name for name in brought if not (import_time and name == "time")]
            order = brought + ["id"] * made_id + ["time"] * import_time
            tree: dict[str, Any] = {self._header[i]: i for i in self._payload}
            for name in order:
                *parents, key = self._paths[name]
                place = tree
                for segment in parents:
                    place = place.setdefault(segment, {})
                place[key] = name
            node = self._nodes[made_id, import_time] = _struct(tree)
        return node


def _struct(tree: dict[str, Any]) -> _Node:
    """The Struct of a JSON object whose keys and values `tree` gives."""
    names = [f"f{n}" for n in range(len(tree))]
    fields = [
        (name, Any, None if isinstance(value, dict) else "")
        for name, value in zip(names, tree.values(), strict=True)
    ]
    cls = msgspec.defstruct(
        "Signal", fields, rename=dict(zip(names, tree, strict=True)), omit_defaults=True, gc=False
    )
    return cls, [_struct(value) if isinstance(value, dict) else value for value in tree.values()]


def _objects(
    node: _Node, columns: Sequence[Sequence[str]], values: Mapping[str, Sequence[str]]
) -> list[Any]:
    cls, sources = node
    return list(
        map(
            cls,
            *(
                columns[source]
                if isinstance(source, int)
                else values[source]
                if isinstance(source, str)
                else _objects(source, columns, values)
                for source in sources
            ),
        )
    )


def columns_problem(columns: dict[str, str]) -> str | None:
    """Why a task's `columns` cannot be used (RowMaker raises ValueError with it), or
    None: each key must be an envelope field, and no column may hold two fields once the
    fields not mapped are read from columns of their own names."""
    unknown = sorted(columns.keys() - set(ENVELOPE_FIELDS))
    if unknown:
        return f"unknown envelope fields {unknown}, expected {ENVELOPE_FIELDS}"
    named = [columns.get(name, name) for name in ENVELOPE_FIELDS]
    twice = sorted({column for column in named if named.count(column) > 1})
    if twice:
        return f"columns {twice} would each hold more than one envelope field"
    return None


def _sources(columns: dict[str, str]) -> dict[str, str]:
    """The column of each envelope field: as mapped, else the field's own name."""
    problem = columns_problem(columns)
    if problem is not None:
        raise ValueError(problem)
    return {name: columns.get(name, name) for name in ENVELOPE_FIELDS}
