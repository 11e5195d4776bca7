"""An import task's `pattern`: which files of its source a run takes.

Three spellings, all of them a path relative to the source channel's root:

- strftime of the run's day: `heap/users-%Y-%m-%d.csv`;
- a quoted date pattern, as Java and the tools it replaces write them:
  `'heap/users-'yyyy-MM-dd'.csv'` (letters outside quotes are date fields: `yyyy`,
  `YYYY`, `yy`, `MM`, `dd`, `HH`; text inside single quotes is literal, `''` a quote);
- either with glob characters (`*`, `?`, `[...]`) in the file name: `heap/users-*.csv`.

A pattern holding a single quote is read as a quoted date pattern, any other as
strftime; `firehosed check` says which for each task. Only the file name may hold glob
characters; the directories are literal, so a run lists one directory of the source,
never walks a tree.
"""

from __future__ import annotations

import re
from datetime import date

from firehosed.names import split_pattern

# Date fields of a quoted pattern, longest first, and their strftime directives.
_FIELDS = (("yyyy", "%Y"), ("YYYY", "%Y"), ("yy", "%y"), ("MM", "%m"), ("dd", "%d"), ("HH", "%H"))


def expand(pattern: str, day: date) -> str:
    """The pattern for a run whose day is `day`: date fields filled, globs kept."""
    return day.strftime(_strftime(pattern))


def style(pattern: str) -> str:
    """Which of the spellings `pattern` is read in, in words (`firehosed check`)."""
    if "'" in pattern:
        kind = "a quoted date pattern (Amperity style: yyyy-MM-dd fields, 'literal text')"
    elif "%" in pattern:
        kind = "strftime"
    else:
        kind = "a fixed path"
    if any(glob in pattern.rsplit("/", 1)[-1] for glob in "*?["):
        kind += ", with a glob"
    return kind


def problem(pattern: str) -> str | None:
    """Why `pattern` cannot select files, or None (`names.split_pattern` says
    what a source can list)."""
    try:
        split_pattern(expand(pattern, date(2026, 12, 31)))
    except ValueError as exc:
        return str(exc)
    return None


def _strftime(pattern: str) -> str:
    """A quoted date pattern as strftime; any other pattern as it is."""
    if "'" not in pattern:
        return pattern
    out: list[str] = []
    at = 0
    while at < len(pattern):
        if pattern.startswith("''", at):
            out.append("'")
            at += 2
        elif pattern[at] == "'":
            end = pattern.find("'", at + 1)
            while end != -1 and pattern.startswith("''", end):
                end = pattern.find("'", end + 2)
            if end == -1:
                raise ValueError(f"a quote opened at character {at + 1} is never closed")
            out.append(pattern[at + 1 : end].replace("''", "'").replace("%", "%%"))
            at = end + 1
        elif pattern[at].isalpha():
            field = next((f for f in _FIELDS if pattern.startswith(f[0], at)), None)
            if field is None:
                run = re.match(r"([A-Za-z])\1*", pattern[at:])
                assert run is not None
                raise ValueError(
                    f"{run[0]!r} is not a date field (yyyy, yy, MM, dd, HH); quote literal text"
                )
            out.append(field[1])
            at += len(field[0])
        else:
            out.append("%%" if pattern[at] == "%" else pattern[at])
            at += 1
    return "".join(out)
