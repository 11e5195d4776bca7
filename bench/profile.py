"""py-spy profiles of the daemon under load, summarized as hot-spot tables.

`py-spy record --format raw` writes collapsed stacks (`frame;frame;… count`, each frame
`function (file:line)`). Self time is the leaf frame's share of samples (by function,
with its hottest line); inclusive time is the share of samples with the function
anywhere on the stack. Samples are of active (non-idle) threads only, so percentages
are of CPU time spent in Python frames plus the C code they call. A leaf at the event
loop's `run` (asyncio/runners.py) is time inside uvloop itself (socket I/O, callbacks).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

from bench.procs import LOAD_CPU, REPO, pinned

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?):(?P<line>\d+)\)$")
# The daemon's entry frames: on every stack, they say nothing about where time goes.
_ENTRY = frozenset(
    {
        "<module> (firehosed/__main__.py)",
        "main (firehosed/cli.py)",
        "_run (firehosed/cli.py)",
    }
)
PY_SPY = REPO / ".venv" / "bin" / "py-spy"


def available() -> bool:
    return PY_SPY.exists() or shutil.which("py-spy") is not None


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Start py-spy (pinned with the load, not on the daemon's CPU) on `pid`."""
    exe = str(PY_SPY) if PY_SPY.exists() else "py-spy"
    argv = pinned(
        LOAD_CPU,
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            f"{max(1, round(seconds))}",
            "--rate",
            "250",
            "--threads",
            "--format",
            "raw",
            "--nonblocking",
            "-o",
            str(out),
        ],
    )
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def summarize(raw: Path, heading: str, top: int = 15) -> list[str]:
    """Markdown: hot spots of the event-loop thread, then of the other threads."""
    threads: dict[bool, list[tuple[list[tuple[str, str]], int]]] = {True: [], False: []}
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        first, *rest = stack.split(";")
        if not rest:
            continue
        threads[first.endswith(": MainThread")].append(([_parse(f) for f in rest], int(count_text)))
    main_total = sum(count for _, count in threads[True])
    other_total = sum(count for _, count in threads[False])
    if main_total == 0:
        return [f"{heading}: py-spy recorded no samples of the event-loop thread."]
    lines = [
        f"{heading} — py-spy at 250 Hz: {main_total} samples of the event-loop (main) "
        f"thread, {other_total} of worker threads (asyncio.to_thread: writes, fsync, "
        "batch encoding; py-spy counts a thread blocked in fsync as active).",
        "",
        *_table("Event-loop thread, self time (leaf frame)", threads[True], top, inclusive=False),
        "",
        *_table(
            "Event-loop thread, inclusive time (firehosed code)", threads[True], top, inclusive=True
        ),
    ]
    if other_total:
        lines += ["", *_table("Worker threads, self time", threads[False], 8, inclusive=False)]
    return lines


def _table(
    title: str, samples: list[tuple[list[tuple[str, str]], int]], top: int, *, inclusive: bool
) -> list[str]:
    total = sum(count for _, count in samples)
    counts: Counter[str] = Counter()
    where: dict[str, Counter[str]] = defaultdict(Counter)
    for frames, count in samples:
        if inclusive:
            for name in {f for f, _ in frames if "firehosed/" in f and f not in _ENTRY}:
                counts[name] += count
        else:
            func, line = frames[-1]
            counts[func] += count
            where[func][line] += count
    if inclusive:
        lines = [f"{title}:", "", "| % | function (file) |", "| ---: | --- |"]
        lines += [f"| {100 * n / total:.1f} | `{func}` |" for func, n in counts.most_common(top)]
        return lines
    lines = [f"{title}:", "", "| % | function (file) | hottest line |", "| ---: | --- | --- |"]
    for func, count in counts.most_common(top):
        hottest = where[func].most_common(1)[0][0]
        lines.append(f"| {100 * count / total:.1f} | `{func}` | `{hottest}` |")
    return lines


def _parse(frame: str) -> tuple[str, str]:
    """(`function (file)`, `file:line`) of one collapsed-stack frame."""
    match = _FRAME.match(frame)
    if match is None:
        return frame, frame
    file = match["file"]
    return f"{match['func']} ({file})", f"{file}:{match['line']}"
