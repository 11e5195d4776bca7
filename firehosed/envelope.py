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

import itertools
import operator
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Union

import msgspec

from firehosed.config import FieldsConfig

_LEAF_TYPES: dict[str, Any] = {
    "type": str,
    "id": Union[str, int],  # noqa: UP007 - msgspec needs a runtime Union here
    "session": Union[str, int, None],  # noqa: UP007
    "person": Union[str, int, None],  # noqa: UP007
    "time": Union[str, int, float],  # noqa: UP007
}
_WRAPPERS = ("$oid", "$date")

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


_Accessor = Callable[[Any], Any]


class EnvelopeReader:
    """Decodes the envelope of a record by one account's field paths."""

    def __init__(self, fields: FieldsConfig) -> None:
        self.paths = {name: getattr(fields, name).split(".") for name in _LEAF_TYPES}
        root_type, get = _build(self.paths)
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(root_type)
        self._type, self._id, self._session = get["type"], get["id"], get["session"]
        self._person, self._time = get["person"], get["time"]
        self._valid_types: set[str] = set()
        self._ids = _id_source()

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


def _build(paths: dict[str, list[str]]) -> tuple[type, dict[str, _Accessor]]:
    """The Struct type for these paths, and one accessor per envelope field."""
    tree: dict[str, Any] = {}
    for name, segments in paths.items():
        node = tree
        for segment in segments[:-1]:
            node = node.setdefault(segment, {})
            if not isinstance(node, dict):
                break
        else:
            node.setdefault(segments[-1], name)
    root = _struct_for(tree, "Envelope")
    return root, {name: _accessor(tree, segments) for name, segments in paths.items()}


_counter = itertools.count()


def _struct_for(node: dict[str, Any], label: str) -> type:
    """A Struct with one optional field per key of `node`, nested for sub-paths."""
    fields: list[tuple[str, Any, Any]] = []
    rename: dict[str, str] = {}
    for index, (segment, child) in enumerate(node.items()):
        attr = f"f{index}"
        rename[attr] = segment
        fields.append((attr, _field_type(child, segment, label), None))
    return msgspec.defstruct(f"{label}{next(_counter)}", fields, rename=rename, gc=False)


def _field_type(child: Any, segment: str, label: str) -> Any:
    if isinstance(child, str):
        return _LEAF_TYPES[child]
    sub = _struct_for(child, label)
    wrapped = [leaf for key, leaf in child.items() if key in _WRAPPERS and isinstance(leaf, str)]
    if len(child) == 1 and wrapped:
        # `{"$oid": x}` or the plain value x itself
        return Union[_LEAF_TYPES[wrapped[0]], sub, None]  # noqa: UP007
    return Union[sub, None]  # noqa: UP007


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

    return get
