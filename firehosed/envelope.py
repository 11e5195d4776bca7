"""Read a signal's envelope (type, id, session, person, time) by the account's field paths.

Per account we build, once, a msgspec Struct type holding only the configured paths, so
decoding a record skips every other field in C and creates no per-record dict. A path
ending in `$oid` or `$date` also accepts the plain value at its parent
(`"signal_id": "abc"` as well as `"signal_id": {"$oid": "abc"}`).

The strings an envelope keeps are bounded in UTF-8 bytes (README, HTTP API): dedupe
remembers every id and catch-up every session key and person, so their memory is only
bounded in bytes if each string is. A record over a limit is rejected, never truncated:
a cut id would collide, a cut session would merge visitors.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import compress, repeat
from typing import Any, Union

import msgspec

from firehosed.fields import FieldsConfig
from firehosed.record import Block

_LEAF_TYPES: dict[str, Any] = {
    "type": str,
    "id": Union[str, int],  # noqa: UP007 - msgspec needs a runtime Union here
    "session": Union[str, int, None],  # noqa: UP007
    "person": Union[str, int, None],  # noqa: UP007
    "time": Union[str, int, float],  # noqa: UP007
}
# Reading a whole request at once, msgspec parses times (RFC 3339) in C; a request with
# a time only `datetime.fromisoformat` takes is read record by record with the above.
_BATCH_LEAF_TYPES = {**_LEAF_TYPES, "time": Union[datetime, int, float]}  # noqa: UP007
_WRAPPERS = ("$oid", "$date")
_TEXT = {str, type(None)}

# Longest id, session and person, and longest time string, in UTF-8 bytes. A person may
# be an e-mail address (254 at most); ISO 8601 with nanoseconds and an offset is 35.
MAX_FIELD_BYTES = 256
MAX_TIME_BYTES = 64
# A str of at most this many characters is within MAX_FIELD_BYTES whatever it holds (4
# UTF-8 bytes per character at most): the one `len()` the hot path pays for most values.
_SURELY_SHORT = MAX_FIELD_BYTES // 4


class Envelope(msgspec.Struct, gc=False):
    """The routing facts of one record; `raw` is the record exactly as received."""

    type: str
    id: str
    session: str | None
    person: str | None
    time: float
    id_assigned: bool


class RecordError(ValueError):
    """A record is rejected; the message says why (it goes back to the client)."""


@dataclass(slots=True)
class Envelopes:
    """The envelopes of a request's readable records, as columns, in order."""

    types: list[str]
    ids: list[str]
    sessions: list[str | None]
    persons: list[str | None]
    times: list[float]
    raws: list[bytes]
    # Per record, whether its id was assigned here (None: no record's was).
    assigned: list[bool] | None = None
    # No record holds a newline or carriage return: joined by newlines they are NDJSON.
    plain: bool = False

    @classmethod
    def empty(cls) -> Envelopes:
        return cls([], [], [], [], [], [])

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, env: Envelope, raw: bytes) -> None:
        """One record read on its own."""
        if env.id_assigned and self.assigned is None:
            self.assigned = [False] * len(self.ids)
        self.types.append(env.type)
        self.ids.append(env.id)
        self.sessions.append(env.session)
        self.persons.append(env.person)
        self.times.append(env.time)
        self.raws.append(raw)
        if self.assigned is not None:
            self.assigned.append(env.id_assigned)

    def extend(self, other: Envelopes) -> None:
        """`other`'s records after these."""
        if self.assigned is not None or other.assigned is not None:
            self.assigned = (self.assigned or [False] * len(self)) + (
                other.assigned or [False] * len(other)
            )
        self.types += other.types
        self.ids += other.ids
        self.sessions += other.sessions
        self.persons += other.persons
        self.times += other.times
        self.raws += other.raws
        self.plain = self.plain and other.plain

    def without(self, drop: Collection[int]) -> Envelopes:
        """These envelopes but those at the indexes `drop`."""
        keep = [True] * len(self.ids)
        for index in drop:
            keep[index] = False
        return Envelopes(
            list(compress(self.types, keep)),
            list(compress(self.ids, keep)),
            list(compress(self.sessions, keep)),
            list(compress(self.persons, keep)),
            list(compress(self.times, keep)),
            list(compress(self.raws, keep)),
            None if self.assigned is None else list(compress(self.assigned, keep)),
            self.plain,
        )

    def part(self, start: int, stop: int) -> Envelopes:
        """Records `start` to `stop` (these envelopes themselves when that is all)."""
        if start <= 0 and stop >= len(self.ids):
            return self
        return self.copy(start, stop)

    def copy(self, start: int = 0, stop: int | None = None) -> Envelopes:
        """Records `start` to `stop` in lists of their own (routing changes those it is
        given: a signal of an identified session gets its person)."""
        return Envelopes(
            self.types[start:stop],
            self.ids[start:stop],
            self.sessions[start:stop],
            self.persons[start:stop],
            self.times[start:stop],
            self.raws[start:stop],
            None if self.assigned is None else self.assigned[start:stop],
            self.plain,
        )

    def block(self, received: float, start: int, stop: int) -> Block:
        """Records `start` to `stop` as a queue's Block."""
        part = self.part(start, stop)
        return Block(
            received,
            part.types,
            part.ids,
            part.sessions,
            part.persons,
            part.times,
            part.raws,
            part.plain,
        )


class _Irregular(Exception):
    """A request the batch read does not take: read it record by record."""


_Accessor = Callable[[Any], Any]


class EnvelopeReader:
    """Decodes the envelope of a record by one account's field paths."""

    def __init__(self, fields: FieldsConfig) -> None:
        self.paths = {name: getattr(fields, name).split(".") for name in _LEAF_TYPES}
        root_type, get = _build(self.paths, _LEAF_TYPES)
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(root_type)
        batch_type, _ = _build(self.paths, _BATCH_LEAF_TYPES)
        self._batch: msgspec.json.Decoder[Any] = msgspec.json.Decoder(batch_type)
        self._type, self._id, self._session = get["type"], get["id"], get["session"]
        self._person, self._time = get["person"], get["time"]
        self._columns = {name: _column(get[name]) for name in _LEAF_TYPES}
        self._valid_types: set[str] = set()
        self._ids = _id_source()

    def read_all(
        self, raws: list[bytes], received: float
    ) -> tuple[Envelopes, list[tuple[int, str]]]:
        """The envelopes of the readable records of `raws`, and (index, why) of the rest.

        The whole request in one msgspec call and a few passes over its columns; a
        request with anything unusual (a rejected record, a time only Python parses,
        a record spanning lines) is read again record by record, with the same result.
        """
        if len(raws) == 1:  # a single signal: the common request, kept short
            try:
                env = self.read(raws[0], received)
            except RecordError as exc:
                return Envelopes.empty(), [(0, str(exc))]
            return Envelopes(
                [env.type],
                [env.id],
                [env.session],
                [env.person],
                [env.time],
                [raws[0]],
                [True] if env.id_assigned else None,
            ), []
        with contextlib.suppress(_Irregular, RecordError, msgspec.DecodeError, RecursionError):
            return self._read_batch(raws, received), []
        envelopes, rejected = Envelopes.empty(), []
        for index, raw in enumerate(raws):
            try:
                envelopes.append(self.read(raw, received), raw)
            except RecordError as exc:
                rejected.append((index, str(exc)))
        return envelopes, rejected

    def _read_batch(self, raws: list[bytes], received: float) -> Envelopes:
        """`read_all` when every record is regular; _Irregular or RecordError if not."""
        # Each record must be one object: `decode_lines` takes any whitespace between
        # values, so a record cut in two (`{"a":1,` then `"b":2}`) would read as one
        # and a line of two as two. `}`, space, `{` is never inside a JSON value: when
        # every record starts with `{` and ends with `}`, and they are as many as the
        # values, each is one.
        if not braced(raws):
            raise _Irregular
        joined = b" ".join(raws)
        roots = self._batch.decode_lines(joined)
        if len(roots) != len(raws):
            raise _Irregular
        columns = self._columns
        types = columns["type"](roots)
        if not self._valid_types.issuperset(types):
            for kind in set(types) - self._valid_types:
                if kind is None:
                    raise _Irregular
                _check_type(kind)
                if len(self._valid_types) < 10_000:
                    self._valid_types.add(kind)
        ids = _texts(columns["id"](roots), "id")
        sessions = _texts(columns["session"](roots), "session")
        persons = _texts(columns["person"](roots), "person")
        if "" in persons:
            persons = [person or None for person in persons]
        assigned = None
        if None in ids:
            assigned = [ident is None for ident in ids]
            ids = [self._ids() if ident is None else ident for ident in ids]
        return Envelopes(
            types,
            ids,  # type: ignore[arg-type]  # (no None left)
            sessions,
            persons,
            _times(columns["time"](roots), received),
            raws,
            assigned,
            b"\n" not in joined and b"\r" not in joined,
        )

    def read(self, raw: bytes, received: float) -> Envelope:
        """Decode `raw` (one JSON object); raise RecordError naming what is wrong."""
        try:
            root = self._decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise RecordError(str(exc)) from None
        except msgspec.DecodeError as exc:
            raise RecordError(f"invalid JSON: {exc}") from None
        except RecursionError:
            raise RecordError("invalid JSON: nested too deeply") from None
        kind = self._type(root)
        if kind is None:
            raise RecordError(f"missing type at {'.'.join(self.paths['type'])}")
        if kind not in self._valid_types:
            _check_type(kind)
            if len(self._valid_types) < 10_000:
                self._valid_types.add(kind)
        ident = self._id(root)
        session = self._session(root)
        person = self._person(root)
        moment = self._time(root)
        # As text (str() returns a str itself; a JSON integer may have thousands of
        # digits), each checked by one len() unless it may be over its limit.
        if ident is not None and len(ident := str(ident)) > _SURELY_SHORT:
            _check_length("id", ident)
        if session is not None and len(session := str(session)) > _SURELY_SHORT:
            _check_length("session", session)
        if person is not None and len(person := str(person)) > _SURELY_SHORT:
            _check_length("person", person)
        return Envelope(
            type=kind,
            id=ident if ident is not None else self._ids(),
            session=session,
            person=person if person != "" else None,
            time=parse_time(moment) if moment is not None else received,
            id_assigned=ident is None,
        )


_first, _last = operator.itemgetter(0), operator.itemgetter(-1)
_tzinfo = operator.attrgetter("tzinfo")


def braced(raws: list[bytes]) -> bool:
    """Whether every record of `raws` starts with `{` and ends with `}` (two C passes)."""
    try:
        firsts, lasts = bytes(map(_first, raws)), bytes(map(_last, raws))
    except IndexError:  # an empty one
        return False
    return firsts.count(b"{") == len(raws) and lasts.count(b"}") == len(raws)


def _texts(values: list[Any], field: str) -> list[str | None]:
    """A column of ids, sessions or persons as text, each checked for length."""
    if not _TEXT.issuperset(map(type, values)):  # JSON integers
        values = [value if value is None else str(value) for value in values]
    if max(map(len, filter(None, values)), default=0) > _SURELY_SHORT:
        for value in values:
            if value is not None:
                _check_length(field, value)
    return values


def _times(moments: list[Any], received: float) -> list[float]:
    """A column of times as unix seconds (decoded as datetime, epoch ms or absent)."""
    kinds = set(map(type, moments))
    if kinds == {datetime} and None not in set(map(_tzinfo, moments)):
        return list(map(datetime.timestamp, moments))
    if kinds == {type(None)}:
        return list(repeat(received, len(moments)))
    return [_moment(moment, received) for moment in moments]


def _moment(value: Any, received: float) -> float:
    if value is None:
        return received
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return parse_time(value)


def _check_length(field: str, value: str, limit: int = MAX_FIELD_BYTES) -> None:
    """RecordError if `value` is over `limit` UTF-8 bytes (`isascii()` is O(1))."""
    size = len(value) if value.isascii() else len(value.encode())
    if size > limit:
        raise RecordError(f"{field} is {size} bytes, at most {limit}")


def _check_type(kind: str) -> None:
    if not 0 < len(kind) <= 64:
        raise RecordError("type must be 1 to 64 characters")
    if "." in kind:
        raise RecordError(f"type {kind!r} must not contain '.'")
    if kind.isdigit():
        raise RecordError(f"type {kind!r} must not be all digits")


def parse_time(value: str | int | float) -> float:
    """ISO 8601 (naive = UTC) or epoch milliseconds, as unix seconds; RecordError if not."""
    if isinstance(value, str):
        if len(value) > MAX_TIME_BYTES:  # checked in characters: not kept, only parsed
            _check_length("time", value, MAX_TIME_BYTES)
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise RecordError(f"unparseable time {value[:64]!r}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if isinstance(value, bool) or not -1e16 < value < 1e16:
        raise RecordError(f"unparseable time {value!r}")
    return value / 1000.0


def _id_source() -> Callable[[], str]:
    """Ids for records that bring none: unique across restarts (time, pid, counter)."""
    prefix = f"fh{time.time_ns() // 1000:x}{os.getpid() & 0xFFFF:04x}"
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter):08x}"


def _build(
    paths: dict[str, list[str]], leaves: dict[str, Any]
) -> tuple[type, dict[str, _Accessor]]:
    """The Struct type for these paths (with these leaf types), and one accessor per
    envelope field (for a record; `_column` makes one for a request's records)."""
    tree: dict[str, Any] = {}
    for name, segments in paths.items():
        node = tree
        for segment in segments[:-1]:
            node = node.setdefault(segment, {})
            if not isinstance(node, dict):
                break
        else:
            node.setdefault(segments[-1], name)
    root = _struct_for(tree, "Envelope", leaves)
    return root, {name: _accessor(tree, segments) for name, segments in paths.items()}


_counter = itertools.count()


def _struct_for(node: dict[str, Any], label: str, leaves: dict[str, Any]) -> type:
    """A Struct with one optional field per key of `node`, nested for sub-paths."""
    fields: list[tuple[str, Any, Any]] = []
    rename: dict[str, str] = {}
    for index, (segment, child) in enumerate(node.items()):
        attr = f"f{index}"
        rename[attr] = segment
        fields.append((attr, _field_type(child, label, leaves), None))
    return msgspec.defstruct(f"{label}{next(_counter)}", fields, rename=rename, gc=False)


def _field_type(child: Any, label: str, leaves: dict[str, Any]) -> Any:
    if isinstance(child, str):
        return leaves[child]
    sub = _struct_for(child, label, leaves)
    wrapped = [leaf for key, leaf in child.items() if key in _WRAPPERS and isinstance(leaf, str)]
    if len(child) == 1 and wrapped:
        # `{"$oid": x}` or the plain value x itself
        return Union[leaves[wrapped[0]], sub, None]  # noqa: UP007
    return Union[sub, None]  # noqa: UP007


def _column(get: _Accessor) -> Callable[[list[Any]], list[Any]]:
    """A field's values for a list of decoded records: one `map` of a single
    attrgetter when every record has the path as Structs all the way (the usual case),
    else `get` record by record."""
    whole = getattr(get, "whole", None)

    def column(roots: list[Any]) -> list[Any]:
        if whole is not None:
            # (AttributeError: a None or a plain `$oid`/`$date` value on the way)
            with contextlib.suppress(AttributeError):
                return list(map(whole, roots))
        return list(map(get, roots))

    return column


def _accessor(tree: dict[str, Any], segments: list[str]) -> _Accessor:
    """A fast getter along the generated attribute names for `segments` (hot path).

    A `None` on the way gives None; a `$oid`/`$date` path whose parent holds the plain
    value gives that value.
    """
    attrs: list[str] = []
    node: Any = tree
    for segment in segments:
        if not isinstance(node, dict) or segment not in node:  # config rejects such paths
            return lambda root: None
        attrs.append(f"f{list(node).index(segment)}")
        node = node[segment]
    if len(attrs) == 1:
        return operator.attrgetter(attrs[0])
    parent = operator.attrgetter(".".join(attrs[:-1]))
    leaf = operator.attrgetter(attrs[-1])
    wrapped = segments[-1] in _WRAPPERS

    def get(root: Any) -> Any:
        try:
            value = parent(root)
        except AttributeError:  # None part-way
            return None
        if value is None:
            return None
        if wrapped and not isinstance(value, msgspec.Struct):
            return value
        return leaf(value)

    get.whole = operator.attrgetter(".".join(attrs))  # type: ignore[attr-defined]
    return get
