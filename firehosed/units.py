"""Human units in the config: durations ("200ms", "30s", "5m", "1h30m") and sizes ("10MiB").

`Duration` and `Size` are the types config Structs declare; `dec_hook` turns the TOML
value into them (a bare number is seconds or bytes).
"""

from __future__ import annotations

import re
from typing import Any

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class Duration(float):
    """A duration in seconds."""


class Size(int):
    """A size in bytes."""


def parse_duration(value: object) -> Duration:
    """Parse `"1h30m"`, `"200ms"` or a number of seconds; raise ValueError if invalid."""
    if isinstance(value, bool):
        raise ValueError('expected a duration like "30s", "5m" or "24h"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().replace(" ", "")
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f'invalid duration {value!r}: use e.g. "200ms", "30s", "5m", "24h"')
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise ValueError('expected a duration like "30s", "5m" or "24h"')
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return Duration(seconds)


def parse_size(value: object) -> Size:
    """Parse `"10MiB"`, `"64MB"` or a number of bytes; raise ValueError if invalid."""
    if isinstance(value, bool):
        raise ValueError('expected a size like "64MiB"')
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        size = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").lower()])
    else:
        raise ValueError(f'invalid size {value!r}: use e.g. "512KiB", "10MiB", "1GB"')
    if size < 0:
        raise ValueError("a size cannot be negative")
    return Size(size)


def dec_hook(type_: type, value: Any) -> Any:
    """msgspec decode hook for the custom unit types."""
    if type_ is Duration:
        return parse_duration(value)
    if type_ is Size:
        return parse_size(value)
    raise TypeError(f"no decoder for {type_!r}")
