"""Dotted paths into a signal: read them for mapped columns, set the person on catch-up.

A path segment that is all digits indexes an array (`cart.p.0.prid`). Reading a path
that does not resolve gives MISSING, never an error: a mapped column is then empty.
"""

from __future__ import annotations

from typing import Any

import msgspec

MISSING: Any = msgspec.UNSET


class Mapping:
    """A named, ordered list of output columns, each a dotted path into the signal."""

    def __init__(self, columns: dict[str, str]) -> None:
        self.columns = list(columns)
        self.paths = [_split(path) for path in columns.values()]

    def values(self, record: Any) -> list[Any]:
        """The value (or MISSING) of each column, in column order, from a decoded record."""
        return [resolve(record, path) for path in self.paths]

    def as_dict(self, record: Any) -> dict[str, Any]:
        """Column name to value for the columns that resolve (JSON `mapped_fields`)."""
        return {
            column: value
            for column, value in zip(self.columns, self.values(record), strict=True)
            if value is not MISSING
        }


def _split(path: str) -> list[str | int]:
    return [int(s) if s.isdigit() else s for s in path.split(".")]


def resolve(value: Any, path: list[str | int]) -> Any:
    """Follow `path` into decoded JSON; MISSING where any step does not exist."""
    for step in path:
        if isinstance(step, int) and isinstance(value, list):
            if step >= len(value):
                return MISSING
            value = value[step]
        elif isinstance(value, dict) and str(step) in value:
            value = value[str(step)]
        else:
            return MISSING
    return value


def set_path(record: dict[str, Any], path: str, value: Any) -> None:
    """Set `value` at a dotted object path, creating (or replacing non-object) parents.

    Used for the person on catch-up. A `$oid` / `$date` last segment is not created:
    the value is put at its parent, the shape signals use for a plain id.
    """
    segments = path.split(".")
    if segments[-1] in ("$oid", "$date") and len(segments) > 1:
        segments = segments[:-1]
    node = record
    for segment in segments[:-1]:
        child = node.get(segment)
        if not isinstance(child, dict):
            child = node[segment] = {}
        node = child
    node[segments[-1]] = value
