"""Names under a channel's root: the checks config validation, the channels and the
import patterns share. No dependency beyond the standard library, so that a process that
only needs the config's types (an import's reading process) does not load asyncio."""

from __future__ import annotations

import re
import unicodedata


def control_character(text: str) -> str | None:
    """The first control character (CR, LF, NUL, TAB, DEL, C1…) in `text`, or None."""
    return next((c for c in text if unicodedata.category(c) == "Cc"), None)


def path_problem(path: str) -> str | None:
    """Why `path` (a prefix or batch name) cannot go under a channel's root, or None.

    It must be relative, without `..` segments, backslashes (a separator on some FTP
    servers) or control characters (CR LF would end an FTP command, or a log line).
    """
    if (bad := control_character(path)) is not None:
        return f"contains a control character ({bad!r})"
    if "\\" in path:
        return "must not contain '\\' (a path separator on some servers)"
    if path.startswith("/"):
        return "must be a relative path (no leading '/')"
    if ".." in path.split("/"):
        return "must be a relative path without '..' segments"
    return None


GLOB = re.compile(r"[*?\[]")


def split_pattern(pattern: str) -> tuple[str, str]:
    """An import pattern as (directory, file name glob), the directory "" for the root.

    Raises ValueError saying why for a pattern `list_files` cannot take: empty, absolute,
    with an empty, '.' or '..' component, glob characters in a directory (only the file
    name may hold them), or anything `path_problem` refuses (backslash, control
    character).
    """
    if not pattern:
        raise ValueError("an import pattern must not be empty")
    if (problem := path_problem(pattern)) is not None:
        raise ValueError(f"import pattern {pattern!r} {problem}")
    directory, _, glob = pattern.rpartition("/")
    parts = pattern.split("/")
    if any(part in ("", ".") for part in parts):
        raise ValueError(f"import pattern {pattern!r} must not hold empty or '.' components")
    if GLOB.search(directory):
        raise ValueError(
            f"import pattern {pattern!r}: only the file name may hold glob characters "
            "(* ? [); its directories are literal"
        )
    return directory, glob
