"""`firehosed config set`: change one key of the config file, keeping everything else.

The file is edited with tomlkit, so comments and layout stay byte for byte outside the
changed line; the new text is validated by the same code `firehosed check` runs
(`config.parse`), and only a valid text replaces the file, atomically (a temp file in
the same directory, fsync, rename, fsync the directory): a crash leaves the old file or
the new one, never half of each.
"""

from __future__ import annotations

import os
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.items import Table

from firehosed import config
from firehosed.errors import ConfigError
from firehosed.fileio import fsync_dir

_PART = re.compile(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*(\.|$)""")


class EditError(Exception):
    """The edit cannot be made; `problems` are `file:line: key: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def split_key(key: str) -> list[str]:
    """A dotted TOML key's parts; a part with a dot in it is quoted: `firehoses."a.b".x`."""
    parts, at = [], 0
    while at < len(key):
        m = _PART.match(key, at)
        if m is None or m.end() == at:
            raise EditError([f"invalid key {key!r}"])
        parts.append(m.group(1).strip("\"'"))
        at = m.end()
    if not parts or key.rstrip().endswith("."):
        raise EditError([f"invalid key {key!r}"])
    return parts


def parse_value(text: str) -> Any:
    """VALUE as TOML (`true`, `5`, `"10MiB"`, `["a", "b"]`), else the text as a string."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def table_names(text: str, table: str) -> set[str]:
    """The names of `[table.NAME]` entries in `text` (none if it does not parse)."""
    try:
        entries = tomllib.loads(text).get(table, {})
    except tomllib.TOMLDecodeError:
        return set()
    return set(entries) if isinstance(entries, dict) else set()


def edited(text: str, key: list[str], value: Any) -> str:
    """`text` with `key` (its parts) set to `value`; missing tables are added at the end."""
    try:
        document = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        raise EditError([f"{exc}"]) from exc
    *tables, name = key
    container: Any = document
    for index, part in enumerate(tables):
        if part not in container:
            container[part] = tomlkit.table(is_super_table=index < len(tables) - 1)
        inner = container[part]
        if not isinstance(inner, Container | Table):
            raise EditError([f"{'.'.join(tables[: index + 1])} is a value, not a table"])
        container = inner
    container[name] = value
    return tomlkit.dumps(document)


def set_key(path: Path, key: list[str], value: Any) -> config.Config:
    """Set `key` in the config file at `path` if the result is valid; the new config.

    Raises EditError with every problem and leaves the file untouched otherwise."""
    named = str(path)  # as the person gave it, in error messages (as `check` does)
    path = path.resolve()  # a symlinked config: replace the file it points to
    text = path.read_text(encoding="utf-8")
    new = edited(text, key, value)
    try:
        loaded = config.parse(new, named)
    except ConfigError as exc:
        raise EditError(exc.problems) from exc
    if new != text:
        replace(path, new.encode("utf-8"))
    return loaded


def replace(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, keeping its permissions."""
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
